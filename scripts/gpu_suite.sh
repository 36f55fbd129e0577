#!/usr/bin/env bash
# The GPU suite of issue 17 in one command: every part time-boxed, JSON under benchmarks/results/,
# a summary table at the end, exit status = sum of the failed parts' values (see --help).
#
#   scripts/gpu_suite.sh                 # on a GPU machine (H100/H200), under 9 minutes
#   scripts/gpu_suite.sh --cpu-check     # here, no GPU: parse every part's command, run the CPU paths
#   scripts/gpu_suite.sh --fetch-wheels  # here, with network: what the GPU machine lacks, into .cache/wheels
#
# The interpreter: $PYTHON if set, else this checkout's .venv (make venv), else python3 (the GPU
# machine's, which holds a CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" scripts/gpu_suite.py "$@"
