#!/usr/bin/env bash
# Does an NF4 base change the science? (issue 25): the miniature's SFT and T-Vaccine (rho 1, gamma 16), seed 1, with
# the recipe's settings (recipes/calibrate_smollm2.sh: N_a 200, N_h 100, 40 steps, batch 10, max length 128,
# lr 1e-3, K 10, J 2), once on the bf16 base (--dtype bf16) and once on the NF4 base (--dtype bf16 --quantize nf4);
# each aligned model evaluated before any attack (HS on the 200 HarmBench prompts, 64 new tokens, `rules` judge; the
# calibration split is every 4th prompt) on the base it was trained on. Every stage is skipped when its output exists.
#   nice -n 10 bash recipes/nf4_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/nf4}
SEED=${SEED:-1}
COMMON_ALIGN="--data-dir $DATA --max-len 128 --batch-size 10 --n-align 200 --n-harmful 100
              --refresh-every 10 --resample-every 2 --save-every 20 --no-progress --seed $SEED --dtype bf16"
declare -A ALIGN=([sft]="--method sft --epochs 2" [tvaccine-r1-g16]="--method tvaccine --rho 1 --gamma 16 --epochs 2")
declare -A BASE=([bf16]="" [nf4]="--quantize nf4")
EVAL="--data-dir $DATA --judge rules --n-hs 200 --max-new-tokens-hs 64 --task none --batch-size 16 --no-progress
      --seed $SEED --dtype bf16"
stage() { local output=$1; shift; [ -e "$output" ] || "$@"; }
fresh_or_resume() { if [ -e "$1/checkpoint.pt" ]; then echo --resume; else echo --overwrite; fi; }
for run in ${RUNS:-sft tvaccine-r1-g16}; do
  for base in ${BASES:-bf16 nf4}; do
    name=$run-$base
    stage $OUT/align-$name/summary.json python tvaccine.py $COMMON_ALIGN ${ALIGN[$run]} ${BASE[$base]} \
      --out $OUT/align-$name $(fresh_or_resume $OUT/align-$name)
    stage $OUT/eval-$name-aligned/results.json python evaluate.py $EVAL ${BASE[$base]} \
      --aligned $OUT/align-$name/adapter --label $name --out $OUT/eval-$name-aligned
  done
done
