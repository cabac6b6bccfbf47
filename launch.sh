#!/usr/bin/env bash
# Gantry: ./launch.sh --config configs/quickstart-grpo.toml datasets/arithmetic.py [key=value ...]
# Sets up ./.venv on first use (scripts/setup.sh), then runs the launcher (gantry/launch/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m gantry.launch "$@"
