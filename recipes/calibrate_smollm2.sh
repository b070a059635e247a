#!/usr/bin/env bash
# Calibration runs on SmolLM2-135M (issue 12, part 1): one seed, every stage resumable (skipped when its output
# exists). Each run is "name|tvaccine.py flags" for alignment and "name|attack.py flags" for attacks; every
# aligned model is evaluated before the attack (HS only) and after each attack (HS + SST-2 FA).
#   RUNS="sft tvaccine-r3" ATTACKS="a1e-3" bash recipes/calibrate_smollm2.sh    # a subset, e.g. one per core
#   RUNS="vaccine-r1" ATTACKS="" bash recipes/calibrate_smollm2.sh               # align and check the gate only
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/calib}
SEED=${SEED:-1}
LABEL_BY=${LABEL_BY:-run}  # row names: the run key (vaccine-r3), or "method" (vaccine) for the main table
N_FA=${N_FA:-100}        # SST-2 validation rows for FA; the main table (recipes/cpu_smollm2.sh) uses 200
# Precision of every stage (issue 21): bf16 where the CPU has bf16 instructions (avx512_bf16 or amx_bf16), fp32
# elsewhere: bf16 weights and matmuls, fp32 LoRA master weights and AdamW state, LoRA math in bf16. Its agreement
# with fp32 (loss, P, HS by blind labels, FA: within the seed-to-seed spread) is in docs/BENCHMARKS.md section 5.
# The runs in results/cpu_smollm2/{calib,main} are fp32: PRECISION=fp32 continues or reproduces them (a run folder
# refuses to resume in another precision).
if [ -z "${PRECISION:-}" ]; then
  if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then PRECISION=bf16
  else PRECISION=fp32; echo "[recipe] this CPU has no bf16 instructions: every stage runs in fp32" >&2; fi
fi
case $PRECISION in
  fp32) TRAIN_PRECISION="--dtype fp32"; EVAL_PRECISION="--dtype fp32" ;;
  bf16) TRAIN_PRECISION="--dtype bf16 --lora-math model"; EVAL_PRECISION="--dtype bf16" ;;
  *) echo "PRECISION must be fp32 or bf16 (got $PRECISION)" >&2; exit 2 ;;
esac

COMMON_ALIGN="--data-dir $DATA --max-len 128 --batch-size 10 --n-align 200 --n-harmful 100
              --refresh-every 10 --resample-every 2 --save-every 20 --no-progress --seed $SEED $TRAIN_PRECISION"
declare -A ALIGN=(
  [sft]="--method sft --epochs 2"
  [vaccine-r3]="--method vaccine --rho 3 --epochs 2"
  [tvaccine-r3]="--method tvaccine --rho 3 --gamma 8 --epochs 2"
  [tvaccine-r1]="--method tvaccine --rho 1 --gamma 8 --epochs 2"
  [tvaccine-r0.3]="--method tvaccine --rho 0.3 --gamma 8 --epochs 2"
  [vaccine-r1]="--method vaccine --rho 1 --epochs 2"
  [vaccine-r0.3]="--method vaccine --rho 0.3 --epochs 2"
  [vaccine-r0.1]="--method vaccine --rho 0.1 --epochs 2"
  [tvaccine-r1-g16]="--method tvaccine --rho 1 --gamma 16 --epochs 2"      # more layers trained per step
  [tvaccine-r1-e4]="--method tvaccine --rho 1 --gamma 8 --epochs 4"        # twice the alignment length
  [tvaccine-r1-g16-e4]="--method tvaccine --rho 1 --gamma 16 --epochs 4"    # the chosen setting, twice as long
  [tvaccine-r1-g16-attn]="--method tvaccine --rho 1 --gamma 16 --epochs 2 --freeze attention --harmful-batch-size 1"  # the authors' code
  [tvaccine-r1-g8]="--method tvaccine --rho 1 --gamma 8 --epochs 2"        # as tvaccine-r1, named for the issue-23 sweep
  [tvaccine-r1-g8-attn]="--method tvaccine --rho 1 --gamma 8 --epochs 2 --freeze attention --harmful-batch-size 1"
  [sft-e4]="--method sft --epochs 4"
  [repnoise]="--method repnoise --epochs 2"
  [tar]="--method tar --epochs 2"                                          # the TAR authors' weight 4
  [tar-w1]="--method tar --tar-weight 1 --epochs 2"                        # lighter tamper-resistance term
  [tar-w0.25]="--method tar --tar-weight 0.25 --epochs 2"
  [tar-on-sft]="--method tar --init-adapter $OUT/align-sft/adapter --epochs 2"  # TAR from the SFT-aligned model
)
COMMON_ATTACK="--data-dir $DATA --max-len 128 --batch-size 10 --task sst2 --poison-ratio 0.1
               --n-harmful-defender 100 --save-every 20 --no-progress --seed $SEED $TRAIN_PRECISION"
declare -A ATTACK=(
  [a1e-3]="--samples 200 --epochs 2 --lr 1e-3"           # the README's first regime: 40 steps
  [a2e-4]="--samples 400 --epochs 4 --lr 2e-4"           # gentler, longer: 160 steps
  [a5e-4]="--samples 400 --epochs 4 --lr 5e-4"           # between the two, 160 steps
  [a5e-4-p0.05]="--samples 400 --epochs 4 --lr 5e-4 --poison-ratio 0.05"  # the harmful-ratio sweep
  [a5e-4-p0.2]="--samples 400 --epochs 4 --lr 5e-4 --poison-ratio 0.2"
)
EVAL="--data-dir $DATA --judge rules --n-hs 200 --max-new-tokens-hs 64 --n-fa $N_FA --max-new-tokens-fa 16
      --batch-size 16 --no-progress --seed $SEED $EVAL_PRECISION"

stage() { local output=$1; shift; [ -e "$output" ] || "$@"; }
# a run folder holding a checkpoint continues from it; anything else starts over
fresh_or_resume() { if [ -e "$1/checkpoint.pt" ]; then echo --resume; else echo --overwrite; fi; }

# ALIGN_EXTRA: flags appended to every alignment (the last occurrence of a flag wins), e.g. the positive control's
# longer budget (issue 23, recipes/positive_control.sh): ALIGN_EXTRA="--n-align 1800"
RUNS=${RUNS:-"nonaligned sft tvaccine-r3 vaccine-r3"}
ATTACKS=${ATTACKS-"a1e-3 a2e-4"}  # ATTACKS="" attacks nothing: the alignments and their evaluation only
for run in $RUNS; do
  if [ "$run" = nonaligned ]; then
    aligned=(); label=(--label non-aligned)
  else
    stage $OUT/align-$run/summary.json python tvaccine.py $COMMON_ALIGN ${ALIGN[$run]} ${ALIGN_EXTRA:-} \
      --out $OUT/align-$run $(fresh_or_resume $OUT/align-$run)
    aligned=(--aligned $OUT/align-$run/adapter)
    if [ "$LABEL_BY" = method ]; then label=(--label ${run%%-*}); else label=(--label $run); fi
  fi
  stage $OUT/eval-$run-aligned/results.json \
    python evaluate.py $EVAL --task none "${aligned[@]}" "${label[@]}" --out $OUT/eval-$run-aligned
  for atk in $ATTACKS; do
    stage $OUT/attack-$run-$atk/summary.json \
      python attack.py $COMMON_ATTACK ${ATTACK[$atk]} "${aligned[@]}" --out $OUT/attack-$run-$atk \
        $(fresh_or_resume $OUT/attack-$run-$atk)
    stage $OUT/eval-$run-$atk/results.json \
      python evaluate.py $EVAL --task sst2 "${aligned[@]}" "${label[@]}" --attacked $OUT/attack-$run-$atk/adapter \
        --out $OUT/eval-$run-$atk
  done
done
