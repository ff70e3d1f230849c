#!/usr/bin/env bash
# Issue 13's GPU check: the one command to run on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh [extra gpu_check.py options]
#
# Installs and downloads nothing: it uses $PYTHON, else the repository's .venv, else python3
# (which must have the project's dependencies, with a CUDA build of torch). Results: one
# file, gpu_check.json, under $OUT when set (the device tool brings $OUT back), else
# ./gpu-results; the markdown tables are printed. Without a GPU it says so and exits 0.
# The script keeps itself under 470 s; `timeout` here is the last guard (8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check.sh: $py ($("$py" -c 'import sys; print(sys.version.split()[0])')), results in $out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || echo "gpu_check.sh: no nvidia-smi"
exec timeout -k 5 480 "$py" benchmarks/gpu_check.py --out "$out" "$@"
