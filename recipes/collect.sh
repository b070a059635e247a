#!/usr/bin/env bash
# Copy the small artefacts of FINISHED runs (configs, summaries, metrics, importance, results, judged
# generations; never adapters or checkpoints) from a runs folder into results/, where git keeps them, and point
# the copies' provenance at the copies:  bash recipes/collect.sh runs/calib results/cpu_smollm2/calib
set -euo pipefail
SRC=${1%/}; DST=${2%/}
mkdir -p "$DST"
for run in "$SRC"/*/; do
  run=${run%/}; name=$(basename "$run")
  [ -e "$run/summary.json" ] || [ -e "$run/results.json" ] || continue   # still running: not yet
  [ -e "$DST/$name" ] && continue   # collected before (and maybe re-judged there since): keep that copy
  mkdir -p "$DST/$name"
  find "$run/" -maxdepth 1 -type f \( -name '*.json' -o -name '*.jsonl' \) -exec cp {} "$DST/$name/" \;
done
# evaluate.py records where the aligned run was (for report.py --plot): the copy's own folder from now on
# (whatever path was recorded, e.g. the target of a linked run folder)
find "$DST" -name results.json -exec sed -i -E "s#\"[^\"]*/(align-[^\"/]*)\"#\"$DST/\\1\"#g" {} +
