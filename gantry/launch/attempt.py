"""One attempt of a node's processes: started with the commands their roles need, watched by the
supervisor until the run ends, stopped together. The launcher (node 0) and `multinode.join_run`
(the other nodes) both run their processes through `run_processes`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from gantry.comm.protocol import WorkerFailed
from gantry.comm.transport import ControlPlane
from gantry.launch.nodes import Placed, with_cpu_shares
from gantry.launch.processes import ProcessGroupSupervisor
from gantry.run.runtime import EXIT_RUN_FAILED, RunInfo

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def run_processes(
    config, info: RunInfo, placed: list[Placed], stop_when: Callable[[], bool] = lambda: False
) -> int:
    """One attempt of this node's processes. On node 0: until the controller exits. On the
    others: until all of them have exited, or `stop_when` (node 0 started the run again). A
    rollout replica that dies is reported to the controller, which goes on without it."""
    run_dir = Path(info.run_dir)
    plane = ControlPlane(info.redis_url)

    def lost(name: str, how: str) -> None:
        replica = name.removeprefix("rollout")
        failed = WorkerFailed(role="rollout", replica=replica, error=f"process died with {how}")
        plane.send(info.keys.events, failed)

    restart = ControllerRestarts(config.fault_tolerance.max_controller_restarts)

    supervisor = ProcessGroupSupervisor(run_dir / "logs")
    placed = with_cpu_shares(placed, sorted(os.sched_getaffinity(0)))
    try:
        for process in placed:
            supervisor.start(process.name, process_command(config, info, process), process.env)
        return supervisor.wait(
            main="controller" if any(p.role == "controller" for p in placed) else None,
            expendable=lambda name: name.startswith("rollout"),
            on_lost=lost,
            stop_when=stop_when,
            restart=restart,
        )
    except KeyboardInterrupt:
        say("interrupted: stopping the run")
        return EXIT_INTERRUPTED
    finally:
        supervisor.stop_all()
        plane.close()


class ControllerRestarts:
    """Whether a dead child is started again: only a controller that died (not one that failed
    the run, EXIT_RUN_FAILED), at most `most` times; its successor carries on from the state
    it kept in Redis (controller.journal)."""

    def __init__(self, most: int) -> None:
        self.most, self.done = most, 0

    def __call__(self, name: str, code: int) -> bool:
        if name != "controller" or code == EXIT_RUN_FAILED or self.done >= self.most:
            return False
        self.done += 1
        say(f"controller restart {self.done}/{self.most}")
        return True


def say(text: str) -> None:
    print(f"[launcher] {text}", file=sys.stderr, flush=True)


def process_command(config, info: RunInfo, process: Placed) -> list[str]:
    """The python arguments of one process. A policy replica is a torchrun agent: all of them
    form one job, replica i being torchrun's node i, with dp_replicate_size x dp_shard_size
    local ranks, meeting at the address node 0 published."""
    run_dir = ["--run-dir", info.run_dir]
    if process.role == "controller":
        return ["-m", "controller", *run_dir]
    if process.role == "rollout":
        cpus = ["--cpus", ",".join(map(str, process.cpus))] if process.cpus else []
        return ["-m", "rollout", *run_dir, "--replica", str(process.replica), *cpus]
    parallel = config.policy.parallelism
    host, port = info.policy_master.rsplit(":", 1)
    return [
        "-m", "torch.distributed.run",
        f"--nnodes={parallel.n_init_replicas}", f"--node-rank={process.replica}",
        f"--nproc-per-node={parallel.ranks_per_replica}",
        f"--master-addr={host}", f"--master-port={port}",
        "-m", "policy", *run_dir, "--replica", str(process.replica),
    ]  # fmt: skip
