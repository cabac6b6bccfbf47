#!/usr/bin/env bash
# Gantry on SLURM: ./slurm.sh --config configs/quickstart-grpo.toml datasets/arithmetic.py \
#   slurm.nodes=2 slurm.partition=gpu [key=value ...] [--dry-run] [--out job.sbatch]
# Sets up ./.venv on first use (scripts/setup.sh), then renders the sbatch script from the
# config's [slurm] section and submits it (gantry/launch/slurm.py); --dry-run prints it instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m gantry.launch.slurm "$@"
