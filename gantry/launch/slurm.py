"""SLURM submission: the sbatch script rendered from the config, and `./slurm.sh`.

    ./slurm.sh --config configs/rl.toml datasets/arithmetic.py slurm.nodes=4 --dry-run
    ./slurm.sh --config configs/rl.toml datasets/arithmetic.py slurm.nodes=4   # sbatch it

The `[slurm]` section itself is `gantry.config.cluster.SlurmConfig`. This module owns
the allocation rules that need the whole config (`allocation_problems`), `render_sbatch` (the
batch script) and the CLI that writes the script to `<log_dir>/<job_name>.sbatch` and submits it.
The script starts one `launch.sh` per node in a single srun step; the launcher assigns roles
from `--nnodes/--node-rank` (node rank 0, the first host, runs the controller). Imports no torch.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from gantry.config import ConfigError, load_config
from gantry.run.checkpoints import COMPLETE

EXIT_BAD_INPUT = 2

# A value sbatch reads from an #SBATCH line as is; others are written in double quotes.
_PLAIN_DIRECTIVE_VALUE = re.compile(r"[A-Za-z0-9_./%:=,@+-]+")


class SlurmError(RuntimeError):
    """SLURM submission cannot proceed (no sbatch, no repository); str() is ready to print."""


# ------------------------------------------------------------------------------ the allocation


def allocation_problems(config) -> list[str]:
    """Rules between [slurm] and the run type (a GantryConfig); one message per problem."""
    slurm = config.slurm
    problems = []
    if slurm.policy_nodes > slurm.nodes:
        problems.append(
            f"slurm.policy_nodes = {slurm.policy_nodes} exceeds slurm.nodes = {slurm.nodes}"
        )
    elif config.train.train_policy.type == "grpo":
        if 1 < slurm.nodes <= slurm.policy_nodes:
            problems.append(
                f"slurm.policy_nodes = {slurm.policy_nodes} leaves none of the {slurm.nodes} "
                f"nodes to rollout replicas (GRPO): use at most {slurm.nodes - 1}, or 0 to let "
                "the launcher split them"
            )
    elif 0 < slurm.policy_nodes < slurm.nodes:
        problems.append(
            f"slurm.policy_nodes = {slurm.policy_nodes} would leave "
            f"{slurm.nodes - slurm.policy_nodes} of the {slurm.nodes} nodes idle: SFT runs "
            "policy replicas only; set it to 0 or to slurm.nodes"
        )
    return problems


def repo_root() -> Path:
    """The checkout holding launch.sh: the one this module lives in, else the current directory."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd().resolve()):
        if (candidate / "launch.sh").is_file():
            return candidate
    raise SlurmError(
        "cannot find launch.sh next to the gantry package nor in the current directory: "
        "run ./slurm.sh from a Gantry checkout"
    )


def _in_root(path: str, root: Path) -> Path:
    """A config path as the job sees it: the job runs in the repository root."""
    return (root / Path(path).expanduser()).resolve()


def log_directory(config, root: Path) -> Path:
    slurm_dir = config.slurm.log_dir or str(Path(config.train.output_dir) / "slurm-logs")
    return _in_root(slurm_dir, root)


# ---------------------------------------------------------------------------------- the script


def _directive(option: str, value: object) -> str:
    """One #SBATCH line; sbatch splits it on blanks, honours double quotes and backslashes."""
    text = str(value)
    if not _PLAIN_DIRECTIVE_VALUE.fullmatch(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH {option}={text}"


def render_sbatch(
    config,
    config_path: str | Path | None,
    dataset_script: str | Path,
    overrides: Sequence[str] = (),
    root: str | Path | None = None,
) -> str:
    """The sbatch script for a validated GantryConfig; `root` is where launch.sh is run from."""
    if problems := allocation_problems(config):
        raise ValueError("\n".join(problems))
    root = Path(root).resolve() if root is not None else repo_root()
    logs = log_directory(config, root)
    run_dir = _in_root(config.train.output_dir, root) / "slurm-<job id>"
    # The user's command line, quoted once: it reaches each node's bash as "$@".
    user_args = ["--config", str(Path(config_path).resolve())] if config_path else []
    user_args += [str(Path(dataset_script).resolve()), *overrides]
    head = _sbatch_directives(config.slurm, logs)
    body = _job_preamble(config.slurm, root, logs, run_dir)
    srun = _srun_command(config.slurm, root, logs, user_args)
    return "#!/bin/bash\n" + "\n".join(head) + "\n" + body + " \\\n  ".join(srun) + "\n"


def _sbatch_directives(slurm, logs: Path) -> list[str]:
    """The #SBATCH lines: the allocation, the job's log files, then the user's own lines."""
    head = [
        _directive("--job-name", slurm.job_name),
        _directive("--nodes", slurm.nodes),
        _directive("--ntasks-per-node", 1),
    ]
    if slurm.gpus_per_node:
        head.append(_directive("--gpus-per-node", slurm.gpus_per_node))
    if slurm.cpus_per_task:
        head.append(_directive("--cpus-per-task", slurm.cpus_per_task))
    if slurm.exclusive:
        head.append("#SBATCH --exclusive")
    if slurm.mem or slurm.exclusive:
        head.append(_directive("--mem", slurm.mem or "0"))  # 0: all of the node's memory
    head.append("#SBATCH --requeue" if slurm.requeue else "#SBATCH --no-requeue")
    if slurm.partition:
        head.append(_directive("--partition", slurm.partition))
    if slurm.account:
        head.append(_directive("--account", slurm.account))
    return head + [
        _directive("--time", slurm.time),
        _directive("--output", logs / "%x-%j.out"),
        _directive("--error", logs / "%x-%j.err"),
        *(f"#SBATCH {arg}" for arg in slurm.sbatch_args),
    ]


def _srun_command(slurm, root: Path, logs: Path, user_args: list[str]) -> list[str]:
    """The srun step's words (joined with line continuations): one launch.sh task per node."""
    node_args = (
        '--nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" '
        '--controller "$HEAD:$GANTRY_CONTROLLER_PORT" --run-id "$GANTRY_RUN_ID"'
    )
    if slurm.policy_nodes:
        node_args += f" --policy-nodes {slurm.policy_nodes}"
    task = [
        # -u is left off: module and conda scripts in the setup lines often read unset variables.
        "set -eo pipefail",
        'launch_args=("$@"); set --  # kept aside: `source x.sh` would hand them to x.sh',
        f"cd {shlex.quote(str(root))}",
        *slurm.setup,
        # A requeued job (preempted, or its node failed) resumes its own run directory.
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && '
        f'compgen -G "$GANTRY_RUN_DIR/checkpoints/step_*/{COMPLETE}" > /dev/null; then',
        '  launch_args+=("train.resume=$GANTRY_RUN_DIR")',
        "fi",
        f'exec ./launch.sh {node_args} "${{launch_args[@]}}"',
    ]
    srun = [
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1',
        f"--output={shlex.quote(str(logs / '%x-%j-node%n.out'))}",
    ]
    if slurm.gpus_per_node:
        srun.append(f"--gpus-per-node={slurm.gpus_per_node}")
    # srun does not inherit the job's --cpus-per-task on every version; on a whole node the
    # step would otherwise get one CPU.
    if slurm.cpus_per_task:
        srun.append(f"--cpus-per-task={slurm.cpus_per_task}")
    else:
        srun.append('--cpus-per-task="$SLURM_CPUS_ON_NODE"')
    return srun + [
        *map(shlex.quote, slurm.srun_args),
        "bash -c " + shlex.quote("\n" + "\n".join(task) + "\n") + " gantry-node",
        " ".join(map(shlex.quote, user_args)),
    ]


def _job_preamble(slurm, root: Path, logs: Path, run_dir: Path) -> str:
    """The script between the #SBATCH lines and srun: where logs go, the run's secret, the head."""
    port = slurm.controller_port or "$((20000 + SLURM_JOB_ID % 40000))"
    port_comment = "slurm.controller_port" if slurm.controller_port else "one per job"
    return f"""
# Rendered by ./slurm.sh (gantry/launch/slurm.py). Submit with: sbatch <this file>
# One srun task per node runs the setup lines, then launch.sh with the node's rank and the
# command line given to slurm.sh (the arguments after gantry-node). Node rank 0, the first
# host, also runs the controller and the run's Redis, which the other nodes dial.
# Logs (%x: job name, %j: job id): this script's in {logs}/%x-%j.out
# and .err; each node's launcher in {logs}/%x-%j-node<N>.out; each role's
# (controller, policy<i>, rollout<i>) in {run_dir}/logs/<role>.log.
set -euo pipefail
cd {shlex.quote(str(root))}

# The run's Redis password: made here, handed to every node through the environment only,
# never written to a file nor echoed.
GANTRY_REDIS_PASSWORD="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
export GANTRY_REDIS_PASSWORD
export GANTRY_RUN_ID="slurm-$SLURM_JOB_ID"
export GANTRY_RUN_DIR={shlex.quote(str(run_dir.parent))}/"$GANTRY_RUN_ID"
# The Redis port on the first node: {port_comment}.
export GANTRY_CONTROLLER_PORT={port}
# sed, not head: it reads all of scontrol's output, so no SIGPIPE trips pipefail.
HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
if [ -z "$HEAD" ]; then
  echo "error: no host in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'" >&2
  exit 1
fi
export HEAD
echo "gantry: job $SLURM_JOB_ID on $SLURM_NNODES node(s), controller $HEAD:$GANTRY_CONTROLLER_PORT"

"""


# ------------------------------------------------------------------------------------- the CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="slurm.sh",
        description="Render the sbatch script of a Gantry run from its config ([slurm] section) "
        "and submit it.",
        epilog="Example: ./slurm.sh --config configs/quickstart-grpo.toml "
        "datasets/arithmetic.py slurm.nodes=2 slurm.partition=gpu --dry-run",
    )
    parser.add_argument("--config", help="TOML config (cosmos-rl section and key names)")
    parser.add_argument("dataset", help="dataset script: get_dataset(config) and reward_fns")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. slurm.nodes=4")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and submit nothing"
    )
    parser.add_argument("--out", help="where to write the script (default: <log_dir>/<job>.sbatch)")
    return parser.parse_intermixed_args(argv)


def submit(script_path: Path) -> str:
    """Run `sbatch script_path`; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError(
            "sbatch not found: run on a SLURM login node, or use --dry-run to print the script"
        )
    result = subprocess.run([sbatch, str(script_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SlurmError(f"sbatch {script_path} failed ({result.returncode}): {result.stderr}")
    match = re.search(r"Submitted batch job (\d+)", result.stdout)
    if match is None:
        raise SlurmError(f"cannot read the job id in sbatch's output: {result.stdout!r}")
    return match.group(1)


def main(argv: Sequence[str] | None = None) -> int:

    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        problems = allocation_problems(config)
        if not Path(args.dataset).is_file():
            problems.append(f"dataset script not found: {args.dataset}")
        if problems:
            raise ConfigError(problems)
        root = repo_root()
    except (ConfigError, SlurmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    script = render_sbatch(config, args.config, args.dataset, args.overrides, root)
    logs = log_directory(config, root)
    out = Path(args.out) if args.out else logs / f"{config.slurm.job_name}.sbatch"
    if args.dry_run:
        print(script, end="")
        if args.out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(script)
        return 0
    logs.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    try:
        job = submit(out)
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    name = config.slurm.job_name
    run_dir = _in_root(config.train.output_dir, root) / f"slurm-{job}"
    print(
        f"submitted job {job} ({out})\n"
        f"job logs: {logs}/{name}-{job}.out, .err; per node: {logs}/{name}-{job}-node<N>.out\n"
        f"role logs: {run_dir}/logs/<role>.log"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
