"""The launcher: `launch.sh --config rl.toml dataset.py [key=value ...]` (or `python -m gantry.launcher`).

It validates the config and the dataset script (exit 2 on bad input, before any worker starts),
creates the run directory `<train.output_dir>/<timestamp>/` with the resolved config, starts the
embedded redis-server unless `redis.url` is set, then the controller, the policy and the rollout
processes, with their output prefixed by role and kept in `logs/`. If a process dies, the others
are stopped and the launcher exits 1 naming it; it exits 0 when training is done.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from datetime import datetime
from pathlib import Path

from gantry.config import ConfigError, config_to_toml, load_config, write_resolved_config
from gantry.placement import LaunchError, find_resume_checkpoint, resolve_parallelism
from gantry.plugin import DatasetScriptError, load_dataset_script
from gantry.processes import ProcessGroupSupervisor
from gantry.redis_server import RedisServer, RedisServerError, free_port
from gantry.runtime import RunInfo, groups_per_step, planned_steps
from gantry.tiny_model import BUILTIN_MODELS

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch.sh",
        description="Run a Gantry post-training job (GRPO) on this machine.",
        epilog="Example: ./launch.sh --config configs/quickstart-grpo.toml "
        "datasets/arithmetic.py train.max_num_steps=20",
    )
    parser.add_argument("--config", help="TOML config (cosmos-rl section and key names)")
    parser.add_argument("dataset", help="dataset script: get_dataset(config) and reward_fns")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optm_lr=1e-5")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the plan, then exit"
    )
    return parser.parse_intermixed_args(argv)  # overrides may follow --dry-run


def resolve_model(name_or_path: str, output_dir: Path) -> str:
    """A built-in model name becomes a local directory, built on first use."""
    if not name_or_path.startswith("gantry:"):
        return name_or_path
    if name_or_path not in BUILTIN_MODELS:
        raise LaunchError(
            f"policy.model_name_or_path = {name_or_path!r} is no built-in model; "
            f"built-ins: {sorted(BUILTIN_MODELS)}, or give a Hugging Face directory or repo id"
        )
    path = output_dir / ".models" / name_or_path.removeprefix("gantry:")
    return str(BUILTIN_MODELS[name_or_path](path).resolve())


def prepare(args: argparse.Namespace):
    """Validate everything a run needs; raises ConfigError, DatasetScriptError or LaunchError."""
    config = resolve_parallelism(load_config(args.config, args.overrides))
    grpo = config.train.train_policy.type == "grpo"
    script = load_dataset_script(args.dataset, need_rewards=grpo)
    dataset_size = len(script.load_samples(config.custom))
    if not grpo and config.validation.enable:
        script.load_val_samples(config.custom)  # fails here, before any worker starts
    steps = planned_steps(config, dataset_size)
    if steps == 0:
        per_step = (
            "policy replicas x train.train_batch_per_replica / rollout.n_generation"
            if grpo
            else "policy replicas x train.train_batch_per_replica"
        )
        raise LaunchError(
            f"the dataset has {dataset_size} samples and train.epoch = {config.train.epoch}, "
            f"but one step takes {groups_per_step(config)} ({per_step}): lower "
            "train.train_batch_per_replica or raise train.epoch"
        )
    return config, script, dataset_size, steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, script, dataset_size, steps = prepare(args)
    except (ConfigError, DatasetScriptError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print(config_to_toml(config), end="")
        parallel = config.policy.parallelism
        print(f"# dataset: {script.path} ({dataset_size} samples); policy steps: {steps}")
        print(
            f"# policy: {parallel.n_init_replicas} replica(s) x {parallel.ranks_per_replica} "
            f"rank(s) (dp_replicate_size {parallel.dp_replicate_size} x dp_shard_size "
            f"{parallel.dp_shard_size}); rollout: {rollout_plan(config)}"
        )
        return 0
    output_dir = Path(config.train.output_dir).resolve()
    try:
        model_path = resolve_model(config.policy.model_name_or_path, output_dir)
        resume_from = find_resume_checkpoint(config.train.resume, output_dir)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = output_dir / stamp
    while run_dir.exists():  # two runs in the same second
        stamp += "-" + secrets.token_hex(2)
        run_dir = output_dir / stamp
    run_dir.mkdir(parents=True)
    write_resolved_config(config, run_dir / "config.json")
    info = RunInfo(
        run_id=stamp,
        run_dir=str(run_dir),
        redis_url="",
        dataset_script=str(script.path),
        dataset_size=dataset_size,
        model_path=model_path,
        resume_from=str(resume_from or ""),
    )
    return run(config, info)


def run(config, info: RunInfo) -> int:
    run_dir = Path(info.run_dir)
    redis_server = None
    url = config.redis.url
    if not url:
        redis_server = RedisServer(run_dir / "redis", config.redis.port, config.redis.executable)
        try:
            url = redis_server.start()
        except RedisServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    info.redis_url = url
    info.write()
    print(f"run directory: {run_dir}", flush=True)
    if info.resume_from:
        print(f"resuming from: {info.resume_from}", flush=True)
    supervisor = ProcessGroupSupervisor(run_dir / "logs")
    try:
        supervisor.start("controller", ["-m", "controller", "--run-dir", str(run_dir)])
        for i, command in enumerate(policy_commands(config, run_dir)):
            supervisor.start(f"policy{i}", command)
        for i in range(rollout_replicas(config)):
            cmd = ["-m", "rollout", "--run-dir", str(run_dir), "--replica", str(i)]
            supervisor.start(f"rollout{i}", cmd)
        code = supervisor.wait(main="controller")
    except KeyboardInterrupt:
        print("[launcher] interrupted: stopping the run", file=sys.stderr, flush=True)
        code = 130
    finally:
        supervisor.stop_all()
        if redis_server is not None:
            redis_server.stop()
    return code if code else report_success(run_dir)


def rollout_replicas(config) -> int:
    """Rollout replicas started with the run: none for SFT, which trains on the dataset."""
    if config.train.train_policy.type == "sft":
        return 0
    return config.rollout.parallelism.n_init_replicas


def rollout_plan(config) -> str:
    if not rollout_replicas(config):
        return "none (SFT)"
    return f"{rollout_replicas(config)} replica(s) x tp {config.rollout.parallelism.tp_size}"


def policy_commands(config, run_dir: Path) -> list[list[str]]:
    """One torchrun agent per policy replica, all joining one job: replica i is torchrun's
    node i, with dp_replicate_size x dp_shard_size local ranks."""
    parallel = config.policy.parallelism
    port = free_port()
    return [
        [
            "-m",
            "torch.distributed.run",
            f"--nnodes={parallel.n_init_replicas}",
            f"--node-rank={i}",
            f"--nproc-per-node={parallel.ranks_per_replica}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "policy",
            "--run-dir",
            str(run_dir),
            "--replica",
            str(i),
        ]  # fmt: skip
        for i in range(parallel.n_init_replicas)
    ]


def report_success(run_dir: Path) -> int:
    result = json.loads((run_dir / "result.json").read_text())
    if "loss_first_10" in result:  # SFT
        progress = (
            f"mean loss {result['loss_first_10']:.3f} (first 10 steps) -> "
            f"{result['loss_last_10']:.3f} (last 10 steps), "
            f"{result['tokens_per_s']:.0f} tokens/s"
        )
        if result.get("val_loss") is not None:
            progress += f", validation loss {result['val_loss']:.3f}"
    else:
        progress = (
            f"mean reward {result['reward_mean_first_10']:.3f} (first 10 steps) -> "
            f"{result['reward_mean_last_10']:.3f} (last 10 steps)"
        )
    print(
        f"training finished in {result['seconds']:.0f}s: {result['steps']} steps, {progress}\n"
        f"exported checkpoint: {result['final_export']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
