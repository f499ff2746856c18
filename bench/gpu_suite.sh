#!/usr/bin/env bash
# The GPU suite: one command, under 8 minutes on one H200 (see bench/gpu_suite.py --help).
#   bash bench/gpu_suite.sh [--out DIR] [--budget SECONDS] [--archive FILE.tar.gz] [--only a,b] [--skip a,b]
#                           [--list] [--dry-run] [--allow-cpu]
# --dry-run prints the commands a run with the same options would run; --allow-cpu runs without a GPU at the
# tools' CPU sizes (a check of the suite itself, its numbers labelled CPU).
# On the device tool: bash bench/gpu_suite.sh --out /tmp/suite --archive "$OUT/gpu-suite.tar.gz"
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$REPO/bench/gpu_suite.py" "$@"
