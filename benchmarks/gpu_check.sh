#!/usr/bin/env bash
# The prepared GPU check (docs/gpus-and-clusters.md), for the one-GPU machine with no network:
#   bash benchmarks/gpu_check.sh OUT            carry gpu_bundle/ (make gpu-bundle) with the tree
#   bash benchmarks/gpu_check.sh --smoke OUT    toy sizes on a CPU (make gpu-rehearsal)
# 1. Without CUDA it stops at once (one line, exit 3) unless --smoke.
# 2. Installs gpu_bundle/ offline into $GPU_SITE (default /tmp/simsiam-gpu-site), put first on PYTHONPATH
#    over the image's own torch: pip with no index and no configuration (install.log). Without gpu_bundle/,
#    a Python that imports the dependencies already (make setup) runs as it is; otherwise one line, exit 1.
# 3. Runs benchmarks/gpu_check.py (checks.jsonl, summary.json, claim.md, logs.tar.gz; console.log).
# Planned seconds on one H100 (gpu_check.py PLAN; basis in docs/gpus-and-clusters.md): install 15, environment 5, data 20,
# detector_memory 35, simsiam_r50_step 30, loader_e2e 25, pretrain_no_stop_gradient 60, pretrain_simsiam 180,
# finetune_simsiam 75, report 5: 450 of the 480-second budget (the side checks run beside the pretrainings).
set -euo pipefail
export GPU_CHECK_START=${GPU_CHECK_START:-$(date +%s)}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE=()
OUT=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=(--smoke) ;;
    -*) echo "gpu_check: unknown option $arg (usage: gpu_check.sh [--smoke] OUT)" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
if [ -z "$OUT" ]; then echo "gpu_check: usage: gpu_check.sh [--smoke] OUT" >&2; exit 2; fi
if [ ${#SMOKE[@]} -eq 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device is visible; run it on the GPU machine, or with --smoke on a CPU" >&2
  exit 3
fi
mkdir -p "$OUT"
SITE=${GPU_SITE:-/tmp/simsiam-gpu-site}
start_ns=$(date +%s%N)
if [ ! -f gpu_bundle/manifest.json ] && "$PY" -c 'import detectron2.engine, fvcore, pycocotools, submitit' 2>/dev/null; then
  # A machine where the project is installed already (make setup): nothing to install.
  echo "gpu_bundle/ absent; the dependencies import from $PY's environment" >"$OUT/install.log"
else
  if ! "$PY" benchmarks/gpu_bundle.py install --bundle gpu_bundle --target "$SITE" >"$OUT/install.log" 2>&1; then
    echo "gpu_check: installing gpu_bundle/ failed: $(tail -n 1 "$OUT/install.log")" >&2
    exit 1
  fi
  export GPU_INSTALL_MS=$(( ($(date +%s%N) - start_ns) / 1000000 )) GPU_SITE="$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
set +e
"$PY" benchmarks/gpu_check.py "${SMOKE[@]}" "$OUT" 2>&1 | tee "$OUT/console.log"
exit "${PIPESTATUS[0]}"
