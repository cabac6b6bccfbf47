#!/usr/bin/env bash
# The virtual environment bench/vs_trl.py runs TRL in: TRL is never a dependency of Gantry, so it
# lives in its own venv, with the torch and transformers versions of Gantry's .venv (so that both
# sides run the same kernels) and a pinned trl.
#   bench/vs_trl_env.sh DIR TORCH_VERSION TRANSFORMERS_VERSION [TRL_VERSION]
# Makes DIR/venv once (a stamp file records the versions; another set rebuilds it). Needs PyPI
# (or the machine's pip index); prints one line naming what failed otherwise.
set -euo pipefail
dir="$1" torch_version="$2" transformers_version="$3" trl_version="${4:-1.16.0}"
venv="$dir/venv"
stamp="$venv/.vs-trl-torch$torch_version-transformers$transformers_version-trl$trl_version"
if [ -f "$stamp" ]; then
  exit 0
fi
mkdir -p "$dir"
log="$dir/setup.log"
fail() {
  echo "cannot make the TRL environment in $venv: $1 failed (log: $log; pip needs a package index)" >&2
  exit 1
}
rm -rf "$venv"
python="${PYTHON:-python3}"
"$python" -m venv "$venv" >"$log" 2>&1 || fail "python -m venv"
pip=("$venv/bin/python" -m pip install --quiet)
# torch first and alone: a plain `pip install transformers` would pull a CUDA torch.
"${pip[@]}" "torch==$torch_version" >>"$log" 2>&1 || fail "pip install torch==$torch_version"
"${pip[@]}" "transformers==$transformers_version" >>"$log" 2>&1 ||
  fail "pip install transformers==$transformers_version"
# trl without its dependencies (they would move torch/transformers), then the ones it imports.
"${pip[@]}" --no-deps "trl==$trl_version" >>"$log" 2>&1 || fail "pip install trl==$trl_version"
"${pip[@]}" "accelerate>=1.10.1" "datasets>=4.7.0" pandas "pyarrow>=21.0.0" psutil >>"$log" 2>&1 ||
  fail "pip install of trl's dependencies"
"$venv/bin/python" -c "import trl.trainer.grpo_trainer" >>"$log" 2>&1 || fail "import trl"
touch "$stamp"
