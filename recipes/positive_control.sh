#!/usr/bin/env bash
# Issue 23, step 1: the positive control at 9x the miniature's alignment budget. SFT and Vaccine (rho 1) aligned on
# N_a 1800 (the safety train split holds 1878 safe rows) for 2 epochs = 360 steps (the miniature: 40), every other
# setting the frozen miniature's (recipes/calibrate_smollm2.sh: batch 10, max length 128, K 10, J 2), then the
# frozen attack a5e-4 and the evaluations (HS on the 200 HarmBench prompts, SST-2 FA on 200 rows), seeds 1-3.
# Step 2 (T-Vaccine, the paper's rule and the authors' code) is RUNS="tvaccine-r1-g16 tvaccine-r1-g16-attn" once
# gamma/rho are calibrated for the longer budget. Every stage resumes (checkpoints every 20 steps) or is skipped
# when its output exists: rerun the same command to continue.
#   bash recipes/positive_control.sh      # bf16 where the CPU has it (PRECISION=fp32 to force); SEEDS="1" RUNS="sft": a part
set -euo pipefail
cd "$(dirname "$0")/.."
for seed in ${SEEDS:-1 2 3}; do
  OUT=${OUT_ROOT:-runs/pc}/seed$seed SEED=$seed RUNS=${RUNS:-"sft vaccine-r1"} ATTACKS=a5e-4 LABEL_BY=method N_FA=200 \
    ALIGN_EXTRA="--n-align 1800" bash recipes/calibrate_smollm2.sh
done
