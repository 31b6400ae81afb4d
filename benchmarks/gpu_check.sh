#!/usr/bin/env bash
# The prepared GPU check: run it on a machine with a GPU and the project installed (make setup).
# Prints one JSON line per check and a summary line; exit 1 if any check failed. See gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_check.py "$@"
