"""The launcher: `launch.sh --config rl.toml dataset.py [key=value ...]` (or `python -m gantry.launch`).

It validates the config and the dataset script (exit 2 on bad input, before any worker starts),
creates the run directory `<train.output_dir>/<timestamp>/` with the resolved config, starts the
embedded redis-server unless `redis.url` is set, then the controller, the policy and the rollout
processes, with their output prefixed by role and kept in `logs/`. A rollout replica that dies
is reported to the controller, which hands its prompts to the others; a controller that dies is
started again alone and carries on from the state it keeps in Redis
(fault_tolerance.max_controller_restarts times); if a policy process dies (or the controller
fails the run), the others are stopped and the run starts again from its last complete
checkpoint (fault_tolerance.max_restarts times), else the launcher exits 1 naming it. An error
that a restart would meet again (bad input found by a worker at start, RUN_DIR/fatal.json) is
not retried: exit 2, one line (a full disk is one). The embedded redis-server that dies is
started again from its append-only file while max_restarts allows, the processes reconnecting
(gantry.launch.redis_server.RedisWatch); else the run stops, exit 1, one line. SIGINT (Ctrl-C),
SIGTERM and SIGHUP stop every process and exit 130, result.json saying "interrupted" and the
last step. It exits 0 when training is done.

The console shows Gantry's lines and, on a terminal, a progress bar (gantry.launch.console);
everything each process writes is in RUN_DIR/logs/. Every process dies with the launcher, even
a SIGKILLed one (gantry.launch.lifeline).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import redis

from gantry.comm.transport import ControlPlane, redis_password
from gantry.config import ConfigError, config_to_toml, load_config, write_resolved_config
from gantry.cosmos import is_cosmos_script
from gantry.data.plugin import DatasetScriptError
from gantry.data.script_check import check_dataset_script
from gantry.launch import outcome
from gantry.launch.attempt import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    STOP_SIGNALS,
    read_fatal,
    run_processes,
    say,
)
from gantry.launch.checks import check_model_exists, check_model_fits
from gantry.launch.console import Console
from gantry.launch.multinode import Cluster, JoinWatch, join_run, publish_run
from gantry.launch.nodes import NodePlanError
from gantry.launch.placement import LaunchError, find_resume_checkpoint, resolve_parallelism
from gantry.launch.processes import Failure
from gantry.launch.redis_server import RedisServer, RedisServerError, RedisWatch, free_port
from gantry.launch.run_secret import (
    check_configured_redis,
    ensure_password,
    take_password_out_of_url,
    write_secret,
)
from gantry.models.tiny import BUILTIN_MODELS
from gantry.run import checkpoints
from gantry.run.runtime import RunInfo, groups_per_step, planned_steps


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
    parser.add_argument(
        "--verbose", action="store_true",
        help="show every line of every process (vLLM, torch, tracebacks) on the console, not "
        "only Gantry's; all of them are in RUN_DIR/logs/<process>.log either way",
    )  # fmt: skip
    nodes = parser.add_argument_group(
        "several nodes", "start the launcher on every node with the same config and dataset"
    )
    nodes.add_argument("--nnodes", type=int, default=1, help="nodes of the run (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0, help="this node; 0 runs the controller")
    nodes.add_argument(
        "--controller", default="", metavar="HOST:PORT",
        help="node 0's address as the others reach it, and the port of the run's Redis there",
    )  # fmt: skip
    nodes.add_argument(
        "--run-id", default="", help="the run directory's name (default: a timestamp)"
    )
    nodes.add_argument(
        "--policy-nodes", type=int, default=0,
        help="GRPO: nodes for the policy, the others for rollout (default: from the GPUs)",
    )  # fmt: skip
    nodes.add_argument(
        "--connect-timeout", type=float, default=300.0,
        help="seconds a node waits for node 0's Redis and run (default 300)",
    )  # fmt: skip
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
    """Validate everything a run needs; raises ConfigError, DatasetScriptError or LaunchError.

    The dataset script is loaded and counted here; one written for cosmos-rl imports torch, so
    it is checked in a child process (gantry.data.script_check) with the run's model, whose
    tokenizer it may use."""
    ignored: dict = {}  # cosmos-rl keys accepted without effect: recorded in run.json
    config = resolve_parallelism(load_config(args.config, args.overrides, ignored=ignored))
    grpo = config.train.train_policy.type == "grpo"
    model_path = None
    if is_cosmos_script(Path(args.dataset)):
        output_dir = Path(config.train.output_dir).resolve()
        model_path = resolve_model(config.policy.model_name_or_path, output_dir)
    script_path, dataset_size = check_dataset_script(
        args.dataset,
        config=config,
        need_rewards=grpo,
        validation=not grpo and config.validation.enable,  # fails here, before any worker
        model_path=model_path,
        config_source=args.config,
    )
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
    return config, script_path, dataset_size, steps, ignored


def main(argv: list[str] | None = None) -> int:
    """The launcher's exit code: 0 done, 1 failed, 2 bad input (never retried), 130
    interrupted (SIGINT, SIGTERM or SIGHUP)."""
    args = parse_args(argv)
    STOP_SIGNALS.install()
    try:
        return launch(args)
    except KeyboardInterrupt as exc:  # before the run started, or after it stopped
        say(f"interrupted ({getattr(exc, 'name', 'SIGINT')})")
        return EXIT_INTERRUPTED


def launch(args: argparse.Namespace) -> int:
    try:
        config, script_path, dataset_size, steps, ignored = prepare(args)
    except (ConfigError, DatasetScriptError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.dry_run:
        print(config_to_toml(config), end="")
        parallel = config.policy.parallelism
        print(f"# dataset: {script_path} ({dataset_size} samples); policy steps: {steps}")
        print(
            f"# policy: {parallel.n_init_replicas} replica(s) x {parallel.ranks_per_replica} "
            f"rank(s) (dp_replicate_size {parallel.dp_replicate_size} x dp_shard_size "
            f"{parallel.dp_shard_size}); rollout: {rollout_plan(config)}"
        )
        return 0
    try:
        cluster = Cluster.of(args, config)
    except (LaunchError, NodePlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not cluster.is_head:
        return join_run(config, cluster, args.connect_timeout)
    output_dir = Path(config.train.output_dir).resolve()
    try:
        take_password_out_of_url(config)  # before config.json is written
        if config.redis.url:  # usable, before anything is made or started
            check_configured_redis(config.redis.url, redis_password())
        model_path = resolve_model(config.policy.model_name_or_path, output_dir)
        check_model_exists(model_path)
        check_model_fits(config, model_path)
        resume_from = find_resume_checkpoint(config.train.resume, output_dir)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_id, run_dir = new_run_dir(output_dir, args.run_id)
    write_resolved_config(config, run_dir / "config.json")
    info = RunInfo(
        run_id=run_id,
        run_dir=str(run_dir),
        redis_url="",
        dataset_script=str(script_path),
        dataset_size=dataset_size,
        model_path=model_path,
        resume_from=str(resume_from or ""),
        head_host=cluster.head_host,
        ignored_config_keys=ignored,
        config_source=keep_config_source(args.config, run_dir),
    )
    return run(config, info, cluster, Console(verbose=args.verbose))


def keep_config_source(config_path: str | None, run_dir: Path) -> str:
    """Copy the user's TOML into the run directory (what the scripts of every process read,
    also after the original is edited); its path, or "" without one."""
    if not config_path:
        return ""
    kept = run_dir / "config.source.toml"
    shutil.copyfile(config_path, kept)
    return str(kept)


def new_run_dir(output_dir: Path, run_id: str) -> tuple[str, Path]:
    """`<output_dir>/<run_id>`; a timestamp when no id is given. A named run directory that
    exists is taken over (a requeued SLURM job keeps its id)."""
    if run_id:
        run_dir = output_dir / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_id, run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = output_dir / stamp
    while run_dir.exists():  # two runs in the same second
        stamp += "-" + secrets.token_hex(2)
        run_dir = output_dir / stamp
    run_dir.mkdir(parents=True)
    return stamp, run_dir


def run(config, info: RunInfo, cluster: Cluster, console: Console | None = None) -> int:
    run_dir = Path(info.run_dir)
    outcome.clear_stale(run_dir)
    # An embedded Redis always has a password (gantry.launch.run_secret); a configured one
    # has the one given, if any.
    password = redis_password() if config.redis.url else ensure_password()
    if password:
        write_secret(run_dir, password)
    budget = RestartBudget(config.fault_tolerance.max_restarts)
    try:
        watch = start_redis(config, run_dir, cluster, password, budget)
    except RedisServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info.redis_url = watch.url
    print(f"run directory: {run_dir}", flush=True)
    console = console or Console()
    console.start_progress(run_dir / "metrics.jsonl", planned_steps(config, info.dataset_size))
    started, failures = time.monotonic(), []
    try:
        code = run_with_restarts(config, info, cluster, console, failures, watch, budget)
    except KeyboardInterrupt:  # between attempts: no process is running
        code = EXIT_INTERRUPTED
    except redis.ConnectionError as exc:  # the launcher's own use of it, between attempts
        say(f"the run's Redis at {info.redis_url} cannot be reached ({exc}); stopping the run")
        code = 1
    finally:
        with STOP_SIGNALS.deferred():
            console.stop()
            watch.close()  # before the server: the thread that restarted it must outlive it
            if watch.server is not None:
                watch.server.stop()
    if code == 0:
        return report_success(run_dir)
    return report_stop(run_dir, code, started, failures)


def report_stop(run_dir: Path, code: int, started: float, failures: list) -> int:
    """result.json for a run that did not finish, and its last line on the console."""
    if code == EXIT_INTERRUPTED:
        result = outcome.write_result(
            run_dir, "interrupted", started, signal=STOP_SIGNALS.caught or "SIGINT"
        )
        say(
            f"stopped at step {result.get('last_step', result.get('steps'))}: {run_dir / 'result.json'}"
        )
        return code
    fatal = read_fatal(run_dir)
    if code == EXIT_BAD_INPUT and fatal is not None:
        log = run_dir / "logs" / f"{fatal['process']}.log"
        outcome.write_result(run_dir, "failed", started, retried=False, **fatal)
        where = f"; full log: {log}" if log.exists() else ""  # none for the launcher's own
        say(
            f"error: {fatal['process']}: {fatal['error']} (not retried: it would fail the same "
            f"way again{where})"
        )
        return EXIT_BAD_INPUT
    last = failures[-1] if failures else None
    outcome.write_result(
        run_dir, "failed", started, exit_code=code,
        **({"process": last.name, "error": last.cause} if last else {}),
    )  # fmt: skip
    return code


class RestartBudget:
    """fault_tolerance.max_restarts, shared by the restarts of the whole run and those of a
    dead embedded redis-server (taken from the Redis watch's thread, hence the lock)."""

    def __init__(self, most: int) -> None:
        self.most, self.used = most, 0
        self._lock = threading.Lock()

    def take(self) -> str | None:
        """One restart ("1/2"), or None when they are spent."""
        with self._lock:
            if self.used >= self.most:
                return None
            self.used += 1
            return f"{self.used}/{self.most}"


def start_redis(config, run_dir: Path, cluster: Cluster, password, budget) -> RedisWatch:
    """The run's Redis, watched (gantry.launch.redis_server.RedisWatch): the embedded server,
    started here with its append-only file in RUN_DIR/redis/, unless redis.url names one."""
    if config.redis.url:
        return RedisWatch(say, url=config.redis.url, password=password).start()
    server = RedisServer(
        run_dir / "redis",
        cluster.redis_port or config.redis.port,
        config.redis.executable,
        bind=cluster.redis_bind,
        password=password,
        die_with_parent=True,
        persist=True,
    )
    server.start()
    return RedisWatch(say, server=server, take_restart=budget.take).start()


def run_with_restarts(
    config, info: RunInfo, cluster: Cluster, console: Console, failures: list,
    watch: RedisWatch, budget: RestartBudget,
) -> int:  # fmt: skip
    """Run the processes; when one the run cannot go on without dies, start them all again
    from the run's last complete checkpoint, while `budget` (fault_tolerance.max_restarts)
    allows. The run's Redis lost for good (`watch`) ends it: exit 1."""
    first_resume, restart = info.resume_from, None
    while True:
        if restart is not None:
            latest = checkpoints.latest_complete(Path(info.run_dir) / checkpoints.CHECKPOINTS)
            info.resume_from = str(latest) if latest is not None else first_resume
            ControlPlane(info.redis_url).delete_prefix(info.keys.prefix)
            info.attempt += 1
            say(
                f"restart {restart}: "
                + (f"resuming from {info.resume_from}" if info.resume_from else "from the start")
            )
        elif info.resume_from:
            print(f"resuming from: {info.resume_from}", flush=True)
        info.policy_master = f"{cluster.head_host}:{free_port(cluster.redis_bind)}"
        info.write()
        publish_run(info, cluster.run_key)  # the other nodes start (again) on this
        joined = JoinWatch(info, cluster, config.fault_tolerance.node_join_timeout_s)
        code = run_processes(
            config, info, cluster.placed, console=console, failures=failures,
            stop_when=lambda joined=joined: joined() or watch.lost is not None,
        )  # fmt: skip
        if watch.lost is not None and code not in (0, EXIT_INTERRUPTED):  # said by the watch
            log = Path(info.run_dir) / "redis" / "redis.log"
            failures.append(Failure("redis-server", "death", watch.lost, log))
            return 1
        if code in (0, EXIT_INTERRUPTED, EXIT_BAD_INPUT):  # a retry would meet bad input again
            return code
        restart = budget.take()
        if restart is None:
            say(
                f"the run failed {info.attempt + 1} time(s) (fault_tolerance.max_restarts = "
                f"{budget.most}{', some spent on its Redis' if watch.restarts else ''})"
            )
            return code


def rollout_replicas(config) -> int:
    """Rollout replicas started with the run: none for SFT, which trains on the dataset."""
    if config.train.train_policy.type == "sft":
        return 0
    return config.rollout.parallelism.n_init_replicas


def rollout_plan(config) -> str:
    if not rollout_replicas(config):
        return "none (SFT)"
    return f"{rollout_replicas(config)} replica(s) x tp {config.rollout.parallelism.tp_size}"


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
