#!/usr/bin/env bash
# Gantry evaluation: ./evaluate.sh --config rl.toml dataset.py --model outputs/RUN/export/final
# Sets up ./.venv on first use (scripts/setup.sh), then runs rollout/evaluate.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup.sh"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
exec "$root/.venv/bin/python" -m rollout.evaluate "$@"
