"""What every process of a run shares: the run directory's files, logging, heartbeats, and the
process boundary where a worker's error is reported to the controller before the exit.

Layout of a run directory (created by the launcher):
    config.json     the resolved config          run.json     RunInfo (redis url, dataset, ...)
    logs/<role>.log each process's output         metrics.jsonl one line per policy step
    export/         HF exports (step_N/, final/)  result.json  the run's outcome (controller)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from gantry.comm.protocol import Keys, WorkerFailed
from gantry.comm.transport import PASSWORD_ENV, ControlPlane, redis_password
from gantry.config import ConfigError, GantryConfig, read_resolved_config
from gantry.run.activity import Activity
from gantry.run.errors import RecursOnRetry, is_disk_full

HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 30.0
# The controller's exit when the run cannot go on (a policy replica failed): the launcher starts
# the run again; any other non-zero exit is the controller's own death, and it restarts alone.
EXIT_RUN_FAILED = 3
# Bad input, found by the launcher or by a worker at start (RUN_DIR/fatal.json says which):
# retrying cannot help, the run stops.
EXIT_BAD_INPUT = 2
FATAL_FILE = "fatal.json"


class RunInfo(BaseModel):
    """Facts the launcher resolved once, for every process of the run."""

    model_config = ConfigDict(extra="forbid")
    run_id: str
    run_dir: str
    redis_url: str
    dataset_script: str
    dataset_size: int
    model_path: str  # resolved: a built-in "gantry:" model becomes its local directory
    resume_from: str = ""  # a complete checkpoint (checkpoints/step_N) to start from
    head_host: str = "127.0.0.1"  # node 0 as every node reaches it (the weight-sync store)
    policy_master: str = ""  # host:port where the policy's torchrun job meets
    attempt: int = 0  # how many times the launcher started the run again
    # cosmos-rl keys of the config accepted without effect (dotted key -> value), see
    # gantry.config.cosmos_keys: what was asked and not acted on, kept with the run.
    ignored_config_keys: dict[str, Any] = Field(default_factory=dict)
    # The user's TOML as written, copied into the run directory: a cosmos-rl script's Config
    # holds its keys that Gantry's schema does not keep ("" when the run had no --config).
    config_source: str = ""

    @classmethod
    def read(cls, run_dir: str | Path) -> RunInfo:
        return cls.model_validate_json((Path(run_dir) / "run.json").read_text())

    def write(self) -> None:
        (Path(self.run_dir) / "run.json").write_text(self.model_dump_json(indent=2) + "\n")

    @property
    def keys(self) -> Keys:
        return Keys(self.run_id)


# Loggers whose lines are Gantry's own: the launcher's console shows them (gantry.launch.console);
# the lines of other loggers (vLLM's, torch's, a library's) are tagged `[logger.name]` and stay in
# the process's log file unless --verbose.
OWN_LOGGERS = ("gantry", "controller", "policy", "rollout")


def _tag_foreign(record: logging.LogRecord) -> bool:
    own = record.name.split(".", 1)[0] in OWN_LOGGERS
    record.origin = "" if own else f"[{record.name}] "
    return True


def setup_logging(role: str) -> logging.Logger:
    # Policy ranks other than 0 (torchrun sets RANK) say only what goes wrong, tagged by rank.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s "
        + (f"rank{rank} " if rank else "")
        + "%(origin)s%(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_tag_foreign)
    return logging.getLogger(f"gantry.{role}")


def parse_worker_args(role: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {role}", description=description)
    parser.add_argument("--run-dir", required=True, help="run directory made by the launcher")
    if role != "controller":
        parser.add_argument("--replica", default="0", help="replica id of this worker")
    if role == "rollout":
        parser.add_argument(
            "--cpus",
            type=_core_list,
            default=None,
            help="CPU cores to compute on, e.g. 0,1 (the launcher splits a CPU node's cores "
            "among its rollout replicas); default: all this process may use",
        )
    return parser.parse_args()


def _core_list(text: str) -> set[int]:
    try:
        cores = {int(core) for core in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus {text!r}: give core numbers like 0,1") from None
    usable = os.sched_getaffinity(0)
    if not cores <= usable:
        raise argparse.ArgumentTypeError(
            f"--cpus {text}: cores {sorted(cores - usable)} are not among the cores this "
            f"process may use ({','.join(map(str, sorted(usable)))})"
        )
    return cores


def load_run(run_dir: str) -> tuple[GantryConfig, RunInfo]:
    """The run's config and facts. A worker started by hand (a late rollout replica on this
    machine) that has no GANTRY_REDIS_PASSWORD takes the run's from RUN_DIR/redis.secret."""
    if not os.environ.get(PASSWORD_ENV) and (password := redis_password(run_dir)):
        os.environ[PASSWORD_ENV] = password
    return read_resolved_config(Path(run_dir) / "config.json"), RunInfo.read(run_dir)


class Heartbeat:
    """Refreshes this worker's heartbeat key from a daemon thread, also while it computes."""

    def __init__(self, plane: ControlPlane, key: str, activity: Activity | None = None) -> None:
        self._plane, self._key, self._activity = plane, key, activity
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()
        _started.set()  # the worker is up: later errors are not counted as start-up errors
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            self._beat()

    def _beat(self) -> None:
        value = self._activity.encode() if self._activity is not None else b"1"
        self._plane.beat(self._key, HEARTBEAT_TTL_S, value)

    def stop(self) -> None:
        self._stop.set()


def run_worker(role: str, replica: str, info: RunInfo, body: Callable[[], None]) -> None:
    """Run a worker's body; on an error, tell the controller why, then exit non-zero:
    EXIT_BAD_INPUT, with RUN_DIR/fatal.json, when the error will recur on any retry."""
    try:
        body()
    except Exception as exc:  # the process boundary: report, then exit non-zero
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        sys.stderr.flush()
        recurs = is_deterministic(exc, started=_started.is_set())
        if recurs:
            record_fatal(info, f"{role}{replica}", error)
        report_failure(role, replica, info, error)
        os._exit(EXIT_BAD_INPUT if recurs else 1)  # engine threads (vLLM) must not keep it alive


def report_failure(role: str, replica: str, info: RunInfo, error: str) -> None:
    """Say why this worker stops: the line the launcher quotes as the cause
    (gantry.launch.console.cause_of), and WorkerFailed to the controller."""
    logging.getLogger(f"gantry.{role}").error("%s %s failed: %s", role, replica, error)
    plane = ControlPlane(info.redis_url)
    plane.send(info.keys.events, WorkerFailed(role=role, replica=replica, error=error))
    plane.close()
    sys.stdout.flush()


# Errors that say the config or the inputs are wrong (a dataset script's code raising, a bad
# sample, a non-finite reward or gradient): whenever they happen, a retry meets them again.
ALWAYS_RECUR = (ConfigError, RecursOnRetry)
# Errors that, before a worker is up (its heartbeat runs, it registers right after), come from
# the config, the files or the code it was given, not from the machine (out of memory, a
# network, a peer): retried, the worker would fail the same way. A broken dataset script
# (gantry.data's DatasetScriptError) is a ValueError.
RECUR_AT_START = (
    ValueError, TypeError, LookupError, AttributeError, ImportError, NotImplementedError,
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
)  # fmt: skip
_started = threading.Event()  # set by the first Heartbeat of this process


def is_deterministic(exc: BaseException, *, started: bool) -> bool:
    if isinstance(exc, ALWAYS_RECUR) or is_disk_full(exc):  # a full disk stays full
        return True
    return not started and isinstance(exc, RECUR_AT_START)


def record_fatal(info: RunInfo, process: str, error: str) -> None:
    """RUN_DIR/fatal.json: an error that a restart would meet again (the first one written
    wins: the others are its consequences). The launcher reads it and stops the run (exit 2).
    The record also goes to the run's Redis, where node 0's launcher finds it when this
    process runs on another node (`FatalWatch`)."""
    first_line = (error.strip().splitlines() or [""])[0]  # its traceback is in the log
    record = json.dumps({"process": process, "error": first_line}) + "\n"
    _write_fatal_file(Path(info.run_dir), record)
    if not info.redis_url:  # the launcher, before its Redis is up
        return
    try:
        plane = ControlPlane(info.redis_url)
        try:
            plane.redis.set(info.keys.fatal, record, nx=True)
        finally:
            plane.close()
    except redis.RedisError:  # the file is written: on node 0, that is what the launcher reads
        pass


def _write_fatal_file(run_dir: Path, record: str) -> None:
    with contextlib.suppress(FileExistsError):
        fd = os.open(run_dir / FATAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(record)


class FatalWatch:
    """Whether a process of the run, on any node, recorded an error a retry would meet again:
    RUN_DIR/fatal.json here, or the record in the run's Redis (looked at once a second), which
    is then copied into RUN_DIR/fatal.json for the launcher's report."""

    def __init__(self, run_dir: Path, plane: ControlPlane, keys: Keys) -> None:
        self.path, self.plane, self.key = run_dir / FATAL_FILE, plane, keys.fatal
        self._next_look = 0.0

    def __call__(self) -> bool:
        if self.path.exists():
            return True
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + 1.0
        return self.look_now()

    def look_now(self) -> bool:
        if self.path.exists():
            return True
        try:
            record = self.plane.redis.get(self.key)
        except (redis.ConnectionError, redis.TimeoutError):  # the run's Redis going away
            return False
        if record is None:
            return False
        _write_fatal_file(self.path.parent, record.decode())
        return True


def host_name() -> str:
    return socket.gethostname()


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def planned_steps(config: GantryConfig, dataset_size: int) -> int:
    """Policy steps of the run: the full batches in `epoch` passes, capped by max_num_steps."""
    steps = config.train.epoch * dataset_size // groups_per_step(config)
    if config.train.max_num_steps is not None:
        steps = min(steps, config.train.max_num_steps)
    return steps


def groups_per_step(config: GantryConfig) -> int:
    """Dataset samples one policy step trains on, all replicas: GRPO prompts (each a group of
    n_generation completions), or SFT conversations."""
    rows = config.train.train_batch_per_replica * config.policy.parallelism.n_init_replicas
    if config.train.train_policy.type == "sft":
        return rows
    return rows // config.rollout.n_generation
