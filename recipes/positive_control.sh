#!/usr/bin/env bash
# Issue 23: the positive control at 9x the miniature's alignment budget, then T-Vaccine two ways at that budget.
# Every alignment: N_a 1800 (the safety train split holds 1878 safe rows; 1772 fit --max-len 128) for 2 epochs =
# 356 steps (the miniature: 40), every other setting the frozen miniature's (recipes/calibrate_smollm2.sh: batch 10,
# max length 128, K 10, J 2), then the frozen attack a5e-4 and the evaluations (HS on the 200 HarmBench prompts,
# SST-2 FA on 200 rows), seeds 1-3.
#   Step 1, the positive control (the default): RUNS="sft vaccine-r1"
#   Step 2, T-Vaccine's calibration on seed 1 (the rule fixed in advance, docs/RESULTS.md: among the settings whose
#   HS before the attack is within 5 points of SFT's, the lowest HS after the attack on the calibration split):
#     SEEDS=1 RUNS="tvaccine-r1-g8 tvaccine-r1-g16"            # (a) the paper's rule: whole layers frozen outside S
#     SEEDS=1 RUNS="tvaccine-r1-g8-attn tvaccine-r1-g16-attn"  # (b) the authors' code: attention LoRA frozen
#                                                              #     outside S, importance from one harmful example
#   then the chosen (a) and (b) on SEEDS="2 3".
# SFT and Vaccine rows are labelled by method (sft, vaccine); T-Vaccine rows by run (tvaccine-r1-g16,
# tvaccine-r1-g16-attn), so that (a) and (b) are separate rows. Every stage resumes (checkpoints every 20 steps)
# or is skipped when its output exists: rerun the same command to continue.
#   bash recipes/positive_control.sh      # bf16 where the CPU has it (PRECISION=fp32 to force); SEEDS="1" RUNS="sft": a part
set -euo pipefail
cd "$(dirname "$0")/.."
for seed in ${SEEDS:-1 2 3}; do
  for run in ${RUNS:-sft vaccine-r1}; do
    case $run in tvaccine*) label_by=run ;; *) label_by=method ;; esac
    OUT=${OUT_ROOT:-runs/pc}/seed$seed SEED=$seed RUNS=$run ATTACKS=a5e-4 LABEL_BY=$label_by N_FA=200 \
      ALIGN_EXTRA="--n-align 1800" bash recipes/calibrate_smollm2.sh
  done
done
