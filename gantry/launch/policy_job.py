"""The policy's torchrun job, met through a store only the run's processes can use.

    python -m gantry.launch.lifeline gantry.launch.policy_job RUN_DIR --nnodes=N \
        --nproc-per-node=R --rdzv-backend=gantry --rdzv-endpoint=HOST:PORT --rdzv-id=ID \
        --rdzv-conf=rank=NODE_RANK -m policy --run-dir RUN_DIR --replica NODE_RANK

runs torchrun (`torch.distributed.run`) with the rendezvous backend "gantry" registered here
(torchrun's supported extension point: `rendezvous_handler_registry.register`). It is
torchrun's static rendezvous (a fixed number of nodes, node ranks given) with another store:

- one node (the job meets at 127.0.0.1): the agent of node 0 hosts a TCPStore on a socket bound
  to 127.0.0.1 (`master_listen_fd`), where torchrun's own static backend would listen on every
  interface; the ranks connect to it as clients (`use_agent_store`), as under torchrun;
- several nodes: the run's Redis, which wants the run's secret (`gantry.comm.store.RedisStore`):
  an agent without it stops with one line; the ranks meet there too (policy.parallel).
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)

from gantry.comm.store import SINGLE_NODE_HOST, RedisStore, StoreRefused, bound_tcp_store
from gantry.comm.transport import redis_password
from gantry.run.runtime import EXIT_BAD_INPUT, RunInfo

BACKEND = "gantry"
JOIN_TIMEOUT_S = 900.0  # as torchrun's static rendezvous: how long agents wait for each other


def job_store(info: RunInfo, *, is_host: bool, name: str, timeout_s: float) -> dist.Store:
    """The store the policy job meets through: a TCPStore on 127.0.0.1 (node 0's agent hosts
    it) on one node, else the run's Redis under `name` (agents and ranks use distinct names)."""
    host, port = info.policy_master.rsplit(":", 1)
    if host == SINGLE_NODE_HOST:
        return bound_tcp_store(host, int(port), is_master=is_host, timeout_s=timeout_s)
    prefix = f"{info.keys.prefix}policy-job:{info.attempt}:{name}/"
    return RedisStore(info.redis_url, redis_password(info.run_dir), prefix, timeout_s)


class GantryRendezvous(RendezvousHandler):
    """torchrun's static rendezvous over `job_store`."""

    def __init__(self, info: RunInfo, node_rank: int, nnodes: int, run_id: str) -> None:
        self.info, self.node_rank, self.nnodes, self.run_id = info, node_rank, nnodes, run_id
        self.store = job_store(
            info, is_host=node_rank == 0, name="agents", timeout_s=JOIN_TIMEOUT_S
        )

    @classmethod
    def create(cls, info: RunInfo, params: RendezvousParameters) -> GantryRendezvous:
        if params.min_nodes != params.max_nodes:
            raise ValueError(f"the {BACKEND} rendezvous takes a fixed --nnodes, not a range")
        rank = params.get_as_int("rank")
        if rank is None:
            raise ValueError(f"the {BACKEND} rendezvous needs --rdzv-conf=rank=NODE_RANK")
        return cls(info, rank, params.max_nodes, params.run_id)

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True  # the ranks do not host a store of their own

    def next_rendezvous(self) -> RendezvousInfo:
        host, port = self.info.policy_master.rsplit(":", 1)
        return RendezvousInfo(
            dist.PrefixStore(self.run_id, self.store),
            self.node_rank,
            self.nnodes,
            RendezvousStoreInfo(host, int(port)),
        )

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def main() -> None:
    run_dir, args = sys.argv[1], sys.argv[2:]
    info = RunInfo.read(run_dir)
    rendezvous_handler_registry.register(
        BACKEND, lambda params: GantryRendezvous.create(info, params)
    )
    from torch.distributed.run import main as torchrun

    try:
        torchrun(args)
    except StoreRefused as exc:  # a node without the run's secret: one line, no traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
