#!/usr/bin/env bash
# Answers of attacked SmolLM2 models to prompts of two other sets (issue 22: the judge on a prompt set it was never
# trained on): AdvBench and Do-Not-Answer, 50 of each, skipping the prompts of D_a (N_a 200), from the attacked
# models of recipes/calibrate_smollm2.sh (PRECISION=bf16, seed 1, attack a5e-4) in $RUNS. Then
#   python judge_study.py --draw all runs/other/eval-* --judge-dir results/judge/other_prompts
# writes blind batches for a rater (LABELLING.md), and `python judge_tune.py other` reports the judges on them.
#   bash recipes/other_prompts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/bf16}
OUT=${OUT:-runs/other}
for run in ${METHODS:-sft vaccine-r1 tvaccine-r1-g16}; do
  for set in advbench donotanswer; do
    [ -e $OUT/eval-$run-$set/results.json ] || python evaluate.py --data-dir $DATA --judge rules \
      --hs-prompts $DATA/harmful_prompts/$set.jsonl --hs-exclude-align 200 --n-hs 50 --max-new-tokens-hs 64 \
      --task none --batch-size 16 --no-progress --seed 1 --dtype bf16 --aligned $RUNS/align-$run/adapter \
      --attacked $RUNS/attack-$run-a5e-4/adapter --label $run --out $OUT/eval-$run-$set
  done
done
