"""A run over several nodes: what each node's launcher knows, and how nodes other than 0 join.

Every node runs `launch.sh --config C dataset.py --nnodes N --node-rank R --controller HOST:PORT`
with the same config. Node 0 (HOST, as the others reach it) starts the run's Redis on HOST:PORT
with a password, the controller and its share of the replicas, then publishes the run (its
`RunInfo`: run directory, dataset, model, where the policy's torchrun job meets) in Redis. The
other nodes wait, a bounded time, for that Redis and that run, then start their share
(`gantry.launch.nodes`): every rank finds its peers through what node 0 published, never through a
hard-coded address. When node 0 starts the run again (`fault_tolerance.max_restarts`), it
publishes a new attempt and every node restarts its processes with it.

The password comes from GANTRY_REDIS_PASSWORD in each node's environment (the SLURM script
generates one per job); a multi-node run without it is refused. It is never written to the run
directory nor logged. Network interfaces: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME in the
environment reach every process.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from gantry.comm.transport import PASSWORD_ENV, ControlPlane, reach, redis_password
from gantry.config import write_resolved_config
from gantry.launch.attempt import EXIT_BAD_INPUT, EXIT_INTERRUPTED, run_processes, say
from gantry.launch.nodes import Placed, node_plan
from gantry.launch.placement import LaunchError, count_gpus
from gantry.launch.processes import EXIT_RESTARTED
from gantry.run.runtime import RunInfo, record_fatal

RUN_KEY = "gantry:launch:"  # + run id: node 0's RunInfo for the other nodes
FOLLOW_RESTART_S = 120.0  # after its processes failed, how long a node waits for a new attempt


@dataclass(frozen=True)
class Cluster:
    """This node's place in the run."""

    nnodes: int
    node_rank: int
    head_host: str  # node 0 as the other nodes reach it ("127.0.0.1" on one node)
    redis_bind: str  # where node 0's Redis listens
    redis_port: int  # 0: any free port (one node)
    run_key: str
    placed: list[Placed]  # the processes this node starts

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0

    @classmethod
    def of(cls, args, config) -> Cluster:
        """From the launcher's --nnodes / --node-rank / --controller / --run-id flags."""
        if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
            raise LaunchError(
                f"--node-rank {args.node_rank} with --nnodes {args.nnodes}: the node rank must "
                "be between 0 and nnodes - 1"
            )
        plan = node_plan(config, args.nnodes, args.policy_nodes, count_gpus())
        run_key = RUN_KEY + args.run_id
        if args.nnodes == 1:
            return cls(1, 0, "127.0.0.1", "127.0.0.1", 0, run_key, plan[0])
        host, port = _controller_address(args.controller)
        if not redis_password():
            raise LaunchError(
                f"a run over {args.nnodes} nodes needs a Redis password in {PASSWORD_ENV} on "
                f"every node (the same one), e.g. export {PASSWORD_ENV}=$(python3 -c 'import "
                "secrets; print(secrets.token_urlsafe(24))') before starting node 0 and share "
                "it; slurm.sh does this for you"
            )
        bind = _local_address(host) if args.node_rank == 0 else host
        return cls(args.nnodes, args.node_rank, host, bind, port, run_key, plan[args.node_rank])


def _controller_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(
            f"--controller {value!r}: a run over several nodes needs node 0's address as the "
            "others reach it and a free port for its Redis, as HOST:PORT (e.g. node-a:6380)"
        )
    return host, int(port)


def _local_address(host: str) -> str:
    """The IP address `host` resolves to, checked to be one of this machine's (node 0 binds
    its Redis there)."""
    try:
        address = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        raise LaunchError(
            f"--controller {host}: node 0 must be that host, but {host} does not resolve to an "
            f"address of this machine ({exc}); start node rank 0 there, or pass its own name"
        ) from None
    return address


def publish_run(info: RunInfo, key: str) -> None:
    plane = ControlPlane(info.redis_url)
    try:
        plane.redis.set(key, info.model_dump_json())
    finally:
        plane.close()


def join_run(config, cluster: Cluster, timeout_s: float) -> int:
    """Node rank > 0: wait for node 0's Redis and run, then run this node's processes, again
    whenever node 0 starts a new attempt."""
    url = config.redis.url or f"redis://{cluster.head_host}:{cluster.redis_port}/0"
    try:
        plane = _reach(url, timeout_s)
        info = _published_run(plane, cluster.run_key, timeout_s, after=-1)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    while True:
        announce_joined(plane, cluster, info.attempt)
        run_dir = Path(info.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)  # without a shared file system
        write_resolved_config(config, run_dir / "config.json")
        info.write()
        print(f"node {cluster.node_rank}: run directory {run_dir} (attempt {info.attempt})")
        watch = _AttemptWatch(plane, cluster.run_key, info.attempt)
        code = run_processes(config, info, cluster.placed, stop_when=watch.changed)
        if code in (0, EXIT_INTERRUPTED, EXIT_BAD_INPUT):  # a retry would meet it again
            return code
        try:  # processes here fail too when node 0 restarts the run: follow it if it does
            wait = timeout_s if code == EXIT_RESTARTED else FOLLOW_RESTART_S
            info = _published_run(plane, cluster.run_key, wait, after=info.attempt)
        except (LaunchError, redis.ConnectionError):
            return code
        say(f"node 0 started the run again: restarting node {cluster.node_rank}'s processes")


def _joined_key(run_key: str, attempt: int, node_rank: int) -> str:
    return f"{run_key}:joined:{attempt}:{node_rank}"


def announce_joined(plane: ControlPlane, cluster: Cluster, attempt: int) -> None:
    """Tell node 0 this node's launcher reached the run (`JoinWatch` waits for it)."""
    key = _joined_key(cluster.run_key, attempt, cluster.node_rank)
    plane.redis.set(key, socket.gethostname(), ex=7 * 24 * 3600)


class JoinWatch:
    """Node 0, during one attempt: whether every other node's launcher has joined. A missing
    node is named after `REPORT_AFTER_S` (its own console says why: a wrong password, an
    unreachable --controller address, another --run-id); at the timeout the run stops with
    exit 2 (restarting node 0 would not bring it), recorded as a fatal error (fatal.json)."""

    REPORT_AFTER_S = 60.0

    def __init__(self, info: RunInfo, cluster: Cluster, timeout_s: float) -> None:
        self.info, self.cluster, self.timeout_s = info, cluster, timeout_s
        self.started = self._next_look = time.monotonic()
        self.waiting = set(range(1, cluster.nnodes))
        self.reported = False
        self.plane = ControlPlane(info.redis_url) if self.waiting else None

    def __call__(self) -> bool:
        """Called by the attempt's supervisor loop: true to stop the attempt."""
        now = time.monotonic()
        if not self.waiting or now < self._next_look:
            return False
        self._next_look = now + 1.0
        for rank in sorted(self.waiting):
            key = _joined_key(self.cluster.run_key, self.info.attempt, rank)
            try:
                host = self.plane.redis.get(key)
            except (redis.ConnectionError, redis.TimeoutError):  # the supervisor reports that
                return False
            if host is not None:
                self.waiting.discard(rank)
                say(f"node {rank} joined ({host.decode()})")
        if not self.waiting:
            self.plane.close()
            return False
        return self._overdue(now - self.started)

    def _overdue(self, waited: float) -> bool:
        missing = ", ".join(str(rank) for rank in sorted(self.waiting))
        hint = (
            "its console says why (a wrong GANTRY_REDIS_PASSWORD, a --controller address it "
            f"cannot reach, another --run-id than {self.cluster.run_key.removeprefix(RUN_KEY)!r})"
        )
        if waited >= min(self.REPORT_AFTER_S, self.timeout_s) and not self.reported:
            self.reported = True
            say(
                f"node(s) {missing} not joined after {waited:.0f}s: {hint}; waiting up to "
                f"{self.timeout_s:.0f}s (fault_tolerance.node_join_timeout_s)"
            )
        if waited < self.timeout_s:
            return False
        self.plane.close()
        record_fatal(
            self.info,
            "launcher",
            f"node(s) {missing} did not join within {self.timeout_s:.0f}s "
            f"(fault_tolerance.node_join_timeout_s): {hint}",
        )
        return True


def _reach(url: str, timeout_s: float) -> ControlPlane:
    deadline = time.monotonic() + timeout_s
    while True:
        client, problem = reach(url, redis_password(), timeout_s=10.0)
        client.close()
        if problem is None:
            return ControlPlane(url)
        kind, detail = problem
        if kind == "refused":
            raise LaunchError(
                f"the run's Redis at {url} refused {PASSWORD_ENV}: give every node the same "
                f"password ({detail})"
            )
        if time.monotonic() > deadline:
            raise LaunchError(
                f"cannot reach the run's Redis at {url} after {timeout_s:.0f}s ({detail}): is "
                "node 0 up, and is --controller its address as this node reaches it?"
            )
        time.sleep(1.0)


def _published_run(plane: ControlPlane, key: str, timeout_s: float, after: int) -> RunInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        raw = plane.redis.get(key)
        if raw is not None:
            info = RunInfo.model_validate_json(raw)
            if info.attempt > after:
                return info
        if time.monotonic() > deadline:
            raise LaunchError(
                f"node 0 published no run under {key} in {plane.url} within {timeout_s:.0f}s: "
                "do all nodes pass the same --run-id?"
            )
        time.sleep(0.5)


class _AttemptWatch:
    """Whether node 0 published a newer attempt; looks at most once a second."""

    def __init__(self, plane: ControlPlane, key: str, attempt: int) -> None:
        self.plane, self.key, self.attempt = plane, key, attempt
        self.next_look = 0.0

    def changed(self) -> bool:
        now = time.monotonic()
        if now < self.next_look:
            return False
        self.next_look = now + 1.0
        try:
            raw = self.plane.redis.get(self.key)
        except (redis.ConnectionError, redis.TimeoutError):  # node 0 finished and left
            return False
        return raw is not None and RunInfo.model_validate_json(raw).attempt != self.attempt
