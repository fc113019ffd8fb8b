#!/usr/bin/env bash
# The paper's offline pipeline on your own GPU: direction adapters, a fine-tuning checkpoint θ_t, SQSD of a benign
# pool at the paper's initialisations (danger at θ_t, safety at θ_0 + 0.5·V_safety), then windows by rank.
#   MODEL=Qwen/Qwen3-8B POOL=dolly.jsonl OUT=runs/paper bash recipes/paper_pipeline.sh
# Set DANGER and SAFETY to existing adapters (e.g. the paper's public ones) to skip building them.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a hub name or local path}
POOL=${POOL:?set POOL to prompt/response records (JSONL, CSV, datasets folder or hub name)}
OUT=${OUT:-runs/paper}

if [ -z "${DANGER:-}" ] || [ -z "${SAFETY:-}" ]; then
  # the paper's data (BeaverTails and Aegis for danger, PKU-SafeRLHF for safety), with the LoRA rank and modules of
  # the fine-tune below (sft_with_monitor.py's defaults: rank 16, all linear layers)
  sqsd directions --model "$MODEL" --out "$OUT/directions" --recipe paper --aegis --rank 16 \
    --target-modules all-linear
  sqsd check-directions "$OUT/directions" --model "$MODEL"
  DANGER="$OUT/directions/danger" SAFETY="$OUT/directions/safety"
  AEGIS="$OUT/directions/danger-aegis"
fi
# θ_t: a short fine-tuning run on the pool itself, monitored (its scores.jsonl is the online view of the same data)
python "$(dirname "$0")/sft_with_monitor.py" --model "$MODEL" --data "$POOL" --danger "danger=$DANGER" \
  --safety "safety=$SAFETY" --out "$OUT/theta_t" --epochs 1
# the paper's protocol: danger at θ_t (--checkpoint), safety at θ_0 + 0.5·V_safety; see docs/offline.md on when to
# leave --checkpoint out
sqsd score "$POOL" --model "$MODEL" --danger "danger=$DANGER" ${AEGIS:+--danger "aegis=$AEGIS"} \
  --safety "safety=$SAFETY" --at paper \
  --checkpoint "$OUT/theta_t" --alpha 0.5 --windows 5 --batch-size 16 --out "$OUT/scores"
echo "windows by rank: $OUT/scores/windows.csv (fine-tune on each to reproduce the paper's table)"
