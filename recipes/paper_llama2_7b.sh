#!/usr/bin/env bash
# The paper's main setting on one GPU: Llama-2-7B, BeaverTails from the Hub, SST-2, p = 0.1, n = 1000, the
# BeaverDam-7B judge, all hyperparameters at the paper's defaults (SPEC section 2). Needs HF_TOKEN with the
# Llama-2 licence accepted. Set SEEDS / METHODS to change what runs: METHODS from sft, vaccine, tvaccine, repnoise,
# tar (the paper's comparison: METHODS="sft vaccine tvaccine repnoise tar").
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-llama2-7b}
OUT=${OUT:-runs/paper_llama2_7b}
SEEDS=${SEEDS:-"42"}
METHODS=${METHODS:-"sft vaccine tvaccine repnoise tar"}
for method in $METHODS; do
  case $method in sft|vaccine|tvaccine|repnoise|tar) ;; *) echo "unknown method in METHODS: $method" >&2; exit 1;; esac
done

for seed in $SEEDS; do
  # non-aligned baseline
  python attack.py --model $MODEL --task sst2 --poison-ratio 0.1 --samples 1000 --seed $seed \
      --out $OUT/attack-nonaligned-s$seed
  python evaluate.py --model $MODEL --attacked $OUT/attack-nonaligned-s$seed/adapter --task sst2 \
      --label non-aligned --out $OUT/eval-nonaligned-s$seed
  for method in $METHODS; do
    python tvaccine.py --model $MODEL --method $method --seed $seed --out $OUT/align-$method-s$seed
    python attack.py --model $MODEL --aligned $OUT/align-$method-s$seed/adapter --task sst2 --poison-ratio 0.1 \
        --samples 1000 --seed $seed --out $OUT/attack-$method-s$seed
    python evaluate.py --model $MODEL --aligned $OUT/align-$method-s$seed/adapter \
        --attacked $OUT/attack-$method-s$seed/adapter --task sst2 --out $OUT/eval-$method-s$seed
  done
done

python report.py $OUT/eval-* --plot --out $OUT
