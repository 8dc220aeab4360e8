#!/usr/bin/env bash
# One-shot device check (README, Performance): on a GPU machine run it once, then commit the JSON it
# writes under benchmarks/results/. On a CPU, `--device cpu --quick` proves the script works (CI does).
#
#   scripts/gpu_check.sh                      # --device cuda: about 5-8 minutes on one H100/H200
#   scripts/gpu_check.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
