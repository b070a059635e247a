#!/usr/bin/env bash
# Labels of other kinds of prompt for the tuned judge (issue 22): answers of seven attacked 356-step T-Vaccine
# models (recipes/positive_control.sh, in $RUNS) to AdvBench and Do-Not-Answer prompts that the test set of
# recipes/other_prompts.sh never uses (it takes each file's first 50 prompts outside D_a).
# Round 1: model k takes the 40 prompts after the first 50 + 40k of each file (no two models share a prompt);
# round 2: every prompt left, Do-Not-Answer's by four models, AdvBench's by three. Then, one folder per round:
#   python judge_study.py --draw all runs/other-train/eval-seed* --judge-dir results/judge/other_prompts_train --first-id 200000 --batch-size 140
#   python judge_study.py --draw all runs/other-train/eval-r2-* --judge-dir results/judge/other_prompts_r2 --first-id 300000 --batch-size 150
# write blind batches for readers (their BRIEF.md), and `--merge --by-set --judge-dir ...` the labels per prompt set.
# Two workers, one per core (about 15 s per 40 answers on one core):
#   WORKER=0 WORKERS=2 bash recipes/other_prompts_train.sh & WORKER=1 WORKERS=2 bash recipes/other_prompts_train.sh &
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/pc}
OUT=${OUT:-runs/other-train}
WORKER=${WORKER:-0}; WORKERS=${WORKERS:-1}
models=(seed1/tvaccine-r1-g8 seed2/tvaccine-r1-g16-attn seed3/tvaccine-r1-g16 seed1/tvaccine-r1-g8-attn
        seed1/tvaccine-r1-g16 seed2/tvaccine-r1-g16 seed3/tvaccine-r1-g16-attn)
job=0
for k in "${!models[@]}"; do
  seed=${models[$k]%%/*}; run=${models[$k]#*/}
  for set in advbench donotanswer; do
    job=$((job + 1))
    [ $((job % WORKERS)) -eq "$WORKER" ] || continue
    out=$OUT/eval-$seed-$run-$set
    [ -e $out/results.json ] || python evaluate.py --data-dir $DATA --judge rules \
      --hs-prompts $DATA/harmful_prompts/$set.jsonl --hs-exclude-align 200 --hs-skip $((50 + 40 * k)) --n-hs 40 \
      --max-new-tokens-hs 64 --task none --batch-size 16 --no-progress --seed ${seed#seed} --dtype bf16 \
      --aligned $RUNS/$seed/align-$run/adapter --attacked $RUNS/$seed/attack-$run-a5e-4/adapter \
      --label $seed-$run --out $out
  done
done

# Round 2: every prompt left after round 1's (the first 50 + 7 x 40 = 330 outside D_a), answered by several of
# the models: Do-Not-Answer's 409 by the first four, AdvBench's 132 by the first three (ROUND2=0: round 1 only).
[ "${ROUND2:-1}" = 1 ] || exit 0
for set_models in "donotanswer 4" "advbench 3"; do
  set=${set_models% *}; n_models=${set_models#* }
  for k in $(seq 0 $((n_models - 1))); do
    job=$((job + 1))
    [ $((job % WORKERS)) -eq "$WORKER" ] || continue
    seed=${models[$k]%%/*}; run=${models[$k]#*/}
    out=$OUT/eval-r2-$seed-$run-$set
    [ -e $out/results.json ] || python evaluate.py --data-dir $DATA --judge rules \
      --hs-prompts $DATA/harmful_prompts/$set.jsonl --hs-exclude-align 200 --hs-skip 330 \
      --n-hs $([ $set = donotanswer ] && echo 409 || echo 132) \
      --max-new-tokens-hs 64 --task none --batch-size 16 --no-progress --seed ${seed#seed} --dtype bf16 \
      --aligned $RUNS/$seed/align-$run/adapter --attacked $RUNS/$seed/attack-$run-a5e-4/adapter \
      --label $seed-$run --out $out
  done
done
