"""One attempt of a node's processes: started with the commands their roles need, watched by the
supervisor until the run ends, stopped together. The launcher (node 0) and `multinode.join_run`
(the other nodes) both run their processes through `run_processes`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import redis

from gantry.comm.protocol import Keys, WorkerFailed
from gantry.comm.transport import LAUNCHER_RETRIES, ControlPlane
from gantry.launch.console import Console, emit
from gantry.launch.nodes import Placed, with_cpu_shares
from gantry.launch.processes import Failure, ProcessGroupSupervisor
from gantry.run.deadline import lapsed_or_overdue
from gantry.run.runtime import EXIT_BAD_INPUT, EXIT_RUN_FAILED, FATAL_FILE, FatalWatch, RunInfo

EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP reached the launcher (STOP_SIGNALS)."""

    def __init__(self, name: str = "SIGINT") -> None:
        super().__init__(name)
        self.name = name


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM (scancel, docker stop, systemd) and SIGHUP (a closed terminal)
    all stop the run the same way: the first one raises Interrupted; later ones are ignored, so
    that stopping the processes is never cut short. Inside `deferred()` (while processes are
    being stopped) the first one waits for the block's end."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.caught: str | None = None
        self.raised = False
        self.depth = 0

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.caught is not None:
            return
        self.caught = signal.Signals(signum).name
        if not self.depth:
            self.raised = True
            raise Interrupted(self.caught)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.caught is not None and not self.raised and not self.depth:
            self.raised = True
            raise Interrupted(self.caught)


STOP_SIGNALS = StopSignals()


def run_processes(
    config,
    info: RunInfo,
    placed: list[Placed],
    stop_when: Callable[[], bool] = lambda: False,
    console: Console | None = None,
    failures: list[Failure] | None = None,
) -> int:
    """One attempt of this node's processes. On node 0: until the controller exits. On the
    others: until all of them have exited, or `stop_when` (node 0 started the run again). A
    rollout replica that dies is reported to the controller, which goes on without it. A
    process that met an error a retry would meet again (RUN_DIR/fatal.json) stops the attempt
    at once: EXIT_BAD_INPUT."""
    run_dir = Path(info.run_dir)
    plane = ControlPlane(info.redis_url, retries=LAUNCHER_RETRIES)

    def lost(name: str, how: str) -> None:
        replica = name.removeprefix("rollout")
        failed = WorkerFailed(role="rollout", replica=replica, error=f"process died with {how}")
        plane.send(info.keys.events, failed)

    fatal = FatalWatch(run_dir, plane, info.keys)  # a recurring error, on any node
    supervisor = ProcessGroupSupervisor(run_dir / "logs", console)
    placed = with_cpu_shares(placed, sorted(os.sched_getaffinity(0)))
    try:
        local = network_env(info)
        for process in placed:
            command = process_command(config, info, process)
            supervisor.start(process.name, command, {**process.env, **local})
        say(f"started {', '.join(p.name for p in placed)}; their logs: {run_dir / 'logs'}/")
        code = supervisor.wait(
            main="controller" if any(p.role == "controller" for p in placed) else None,
            expendable=lambda name: name.startswith("rollout"),
            on_lost=lost,
            stop_when=lambda: stop_when() or fatal(),
            restart=ControllerRestarts(config.fault_tolerance.max_controller_restarts),
            hung=HeartbeatWatch(plane, info.keys, placed),
        )
        return EXIT_BAD_INPUT if fatal.look_now() else code
    except KeyboardInterrupt as exc:  # Ctrl-C, or Interrupted: SIGTERM, SIGHUP
        say(f"interrupted ({getattr(exc, 'name', 'SIGINT')}): stopping the run")
        return EXIT_INTERRUPTED
    finally:
        with STOP_SIGNALS.deferred():
            supervisor.stop_all()
            plane.close()
            if failures is not None and supervisor.failure is not None:
                failures.append(supervisor.failure)


def network_env(info: RunInfo) -> dict[str, str]:
    """On one node (the run meets at 127.0.0.1, gantry.comm.store.SINGLE_NODE_HOST), gloo's and
    NCCL's sockets (the process groups of the policy job, of weight sync, of vLLM's TP workers)
    listen on the loopback interface: by themselves they take the address the host name
    resolves to, or the first network interface, open to other machines. An interface the
    user chose (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) is kept. Across nodes: where the
    stores in the run's Redis are (gantry.comm.store.RUN_STORE_ENV), for the weight sync."""
    if info.head_host != "127.0.0.1":
        return {"GANTRY_RUN_STORE": f"{info.redis_url} {info.keys.prefix}sync-store/"}
    names = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    return {name: "lo" for name in names if not os.environ.get(name)}


def read_fatal(run_dir: Path) -> dict | None:
    """The error a retry would meet again, as a worker recorded it (None without one)."""
    path = run_dir / FATAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class ControllerRestarts:
    """Whether a dead child is started again: only a controller that died (not one that failed
    the run, EXIT_RUN_FAILED, or met bad input, EXIT_BAD_INPUT), at most `most` times; its
    successor carries on from the state it kept in Redis (controller.journal)."""

    def __init__(self, most: int) -> None:
        self.most, self.done = most, 0

    def __call__(self, name: str, code: int) -> bool:
        if name != "controller" or code in (EXIT_RUN_FAILED, EXIT_BAD_INPUT):
            return False
        if self.done >= self.most:
            return False
        self.done += 1
        say(f"controller restart {self.done}/{self.most}")
        return True


class HeartbeatWatch:
    """Whether a policy or rollout process stopped working: its heartbeat key, seen before,
    has lapsed (the controller drops such a replica, or starts the run again), or says it is
    long past its deadline; what it was doing, or "" (gantry.run.deadline.lapsed_or_overdue).
    The launcher then kills it: a hung or SIGSTOPped process is never left behind."""

    def __init__(self, plane: ControlPlane, keys: Keys, placed: list[Placed]) -> None:
        self.plane, self.seen = plane, {}
        self.keys = {
            p.name: keys.heartbeat(p.role, str(p.replica)) for p in placed if p.role != "controller"
        }

    def __call__(self, name: str) -> str:
        key = self.keys.get(name)
        if key is None:
            return ""
        try:
            value = self.plane.redis.get(key)
        except redis.RedisError:
            return ""  # Redis itself is in trouble: that is reported elsewhere
        return lapsed_or_overdue(self.seen, name, value)


def say(text: str) -> None:
    emit(f"[launcher] {text}", err=True)


def process_command(config, info: RunInfo, process: Placed) -> list[str]:
    """The python arguments of one process. A policy replica is a torchrun agent: all of them
    form one job, replica i being torchrun's node i, with dp_replicate_size x dp_shard_size
    local ranks, meeting through the store of gantry.launch.policy_job (127.0.0.1 on one node,
    the run's Redis and its secret across nodes). The agent runs under gantry.launch.lifeline,
    which makes it die with the launcher (its ranks have sessions of their own, which it
    kills)."""
    run_dir = ["--run-dir", info.run_dir]
    if process.role == "controller":
        return ["-m", "controller", *run_dir]
    if process.role == "rollout":
        cpus = ["--cpus", ",".join(map(str, process.cpus))] if process.cpus else []
        return ["-m", "rollout", *run_dir, "--replica", str(process.replica), *cpus]
    parallel = config.policy.parallelism
    return [
        "-m", "gantry.launch.lifeline", "gantry.launch.policy_job", info.run_dir,
        f"--nnodes={parallel.n_init_replicas}", f"--nproc-per-node={parallel.ranks_per_replica}",
        "--rdzv-backend=gantry", f"--rdzv-endpoint={info.policy_master}",
        f"--rdzv-id={info.run_id}-{info.attempt}", f"--rdzv-conf=rank={process.replica}",
        "-m", "policy", *run_dir, "--replica", str(process.replica),
    ]  # fmt: skip
