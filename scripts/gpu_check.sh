#!/usr/bin/env bash
# Measure everything on a GPU in one call; see scripts/gpu_check.py. Writes $OUT/report.json, summary.md, logs.txt.
#   bash scripts/gpu_check.sh [--install] [--dry] [--budget_s 480]
cd "$(dirname "$0")/.." && exec python scripts/gpu_check.py "$@"
