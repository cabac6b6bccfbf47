"""Which processes each node of a run starts, and on which of its GPUs.

Every node's launcher computes the same plan from the config and the node count, then starts
its own part. Node 0 runs the controller. A GRPO run puts the policy replicas on the first
`policy_nodes` nodes and the rollout replicas on the others (one node: all on it); an SFT run
trains on every node. Replicas are spread evenly, whole: a policy replica (a torchrun agent of
`ranks_per_replica` local ranks) or a rollout replica (a vLLM engine over `tp_size` GPUs) never
spans two nodes in this version. On a node with GPUs each process gets its own contiguous
devices (CUDA_VISIBLE_DEVICES): the policy's first, then the rollout replicas' (on a one-GPU
node a single-rank policy and one transformers rollout replica share it: `shares_one_gpu`). On a node
without GPUs the rollout replicas split the node's CPU cores instead (`with_cpu_shares`, at
launch, from the cores that node's launcher may use): each engine computes on its own cores,
rather than every engine running a thread per core on all of them (a thread pool per engine
on the same cores made two replicas on 2 cores 5x slower than one).

    plan = node_plan(config, nnodes=4, policy_nodes=0, gpus_per_node=8)
    plan[2]  # [Placed("rollout0", "rollout", 0, (0, 1)), Placed("rollout1", "rollout", 1, (2, 3)), ...]

Imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from gantry.config import GantryConfig


class NodePlanError(ValueError):
    """The replicas cannot be spread over the nodes; the message says what to change."""


@dataclass(frozen=True)
class Placed:
    """One process a node's launcher starts."""

    name: str  # its log name: controller, policy<i>, rollout<j>
    role: Literal["controller", "policy", "rollout"]
    replica: int
    gpus: tuple[int, ...] = ()  # this node's devices it may use (CUDA_VISIBLE_DEVICES)
    cpus: tuple[int, ...] = ()  # a CPU node's cores it computes on (rollout replicas only)

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))} if self.gpus else {}


def node_plan(
    config: GantryConfig, nnodes: int, policy_nodes: int = 0, gpus_per_node: int = 0
) -> list[list[Placed]]:
    """The processes of each node, node 0 first."""
    if nnodes < 1:
        raise NodePlanError(f"--nnodes must be at least 1, got {nnodes}")
    grpo = config.train.train_policy.type == "grpo"
    n_policy = config.policy.parallelism.n_init_replicas
    n_rollout = config.rollout.parallelism.n_init_replicas if grpo else 0
    if nnodes == 1:
        policy_on, rollout_on = [list(range(n_policy))], [list(range(n_rollout))]
    else:
        k = _policy_node_count(config, nnodes, policy_nodes, gpus_per_node) if grpo else nnodes
        policy_on = _spread(n_policy, k, "policy.parallelism.n_init_replicas", "policy")
        rollout_on = (
            _spread(n_rollout, nnodes - k, "rollout.parallelism.n_init_replicas", "rollout")
            if grpo
            else []
        )
        policy_on += [[] for _ in range(nnodes - k)]
        rollout_on = [[] for _ in range(k)] + rollout_on
    plan = []
    for node in range(nnodes):
        placed = [Placed("controller", "controller", 0)] if node == 0 else []
        placed += _with_gpus(config, node, policy_on[node], rollout_on[node], gpus_per_node)
        plan.append(placed)
    return plan


def _policy_node_count(
    config: GantryConfig, nnodes: int, policy_nodes: int, gpus_per_node: int
) -> int:
    if policy_nodes:
        k = policy_nodes
    elif gpus_per_node:
        parallel = config.policy.parallelism
        k = math.ceil(parallel.n_init_replicas * parallel.ranks_per_replica / gpus_per_node)
    else:  # CPU nodes: half and half
        k = max(1, nnodes // 2)
    if not 1 <= k < nnodes:
        raise NodePlanError(
            f"{k} policy node(s) of {nnodes} leave no node for the rollout replicas: a GRPO run "
            "needs at least one of each; set --policy-nodes (slurm.policy_nodes) between 1 and "
            f"{nnodes - 1}, or use more nodes"
        )
    return k


def _spread(replicas: int, nodes: int, key: str, what: str) -> list[list[int]]:
    if replicas % nodes:
        raise NodePlanError(
            f"{key} = {replicas} {what} replicas cannot be spread evenly over {nodes} {what} "
            f"node(s): use a multiple of {nodes}, or change the node split (--policy-nodes)"
        )
    per_node = replicas // nodes
    return [list(range(n * per_node, (n + 1) * per_node)) for n in range(nodes)]


def shares_one_gpu(config: GantryConfig, gpus: int) -> bool:
    """Whether a GRPO run's policy and rollout share a node's only GPU: one single-rank policy
    replica and one single-rank transformers rollout replica. vLLM would take the memory the
    policy needs. The weight sync between them then runs over gloo (gantry.comm.sync_groups)."""
    policy, rollout = config.policy.parallelism, config.rollout.parallelism
    return (
        gpus == 1
        and config.train.train_policy.type == "grpo"
        and config.rollout.backend == "transformers"
        and policy.n_init_replicas == policy.dp_replicate_size == 1
        and policy.dp_shard_size in (1, -1)
        and rollout.n_init_replicas == rollout.tp_size == 1
    )


def _with_gpus(
    config: GantryConfig, node: int, policy: list[int], rollout: list[int], gpus: int
) -> list[Placed]:
    if policy and rollout and shares_one_gpu(config, gpus):
        return [Placed("policy0", "policy", 0, (0,)), Placed("rollout0", "rollout", 0, (0,))]
    sizes = [("policy", r, config.policy.parallelism.ranks_per_replica) for r in policy]
    sizes += [("rollout", r, config.rollout.parallelism.tp_size) for r in rollout]
    needed = sum(size for _, _, size in sizes)
    if gpus and needed > gpus:
        raise NodePlanError(
            f"node {node} would run {len(policy)} policy and {len(rollout)} rollout replica(s) "
            f"needing {needed} GPUs, but has {gpus}: use more nodes or smaller replicas"
        )
    placed, first = [], 0
    for role, replica, size in sizes:
        devices = tuple(range(first, first + size)) if gpus else ()
        placed.append(Placed(f"{role}{replica}", role, replica, devices))
        first += size
    return placed


def with_cpu_shares(placed: list[Placed], cores: list[int]) -> list[Placed]:
    """`placed` with the CPU cores of a node without GPUs split among its rollout replicas:
    contiguous, even shares (a replica's TP workers split its share again); more replicas
    than cores share cores round-robin. The policy and controller are not pinned: the
    policy's threads follow its ranks (policy.worker), and it trains while replicas wait."""
    rollouts = [p for p in placed if p.role == "rollout"]
    if not rollouts or any(p.gpus for p in placed) or not cores:
        return placed
    if len(rollouts) > len(cores):
        shares = [(cores[i % len(cores)],) for i in range(len(rollouts))]
    else:
        size = len(cores) // len(rollouts)
        shares = [tuple(cores[i * size : (i + 1) * size]) for i in range(len(rollouts))]
    by_name = {p.name: share for p, share in zip(rollouts, shares, strict=True)}
    return [replace(p, cpus=by_name[p.name]) if p.name in by_name else p for p in placed]
