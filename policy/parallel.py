"""The policy job's process layout and the FSDP2 sharding of its model.

A policy job is `dp_replicate x dp_shard` ranks (one torchrun agent per policy replica, each with
`dp_replicate_size x dp_shard_size` local ranks). The model is sharded with FSDP2
(`fully_shard`) over a device mesh ("dp_replicate", "dp_shard"): parameters, gradients and
optimizer state are sharded inside a row of the mesh and replicated across rows (HSDP), so
gradients are reduce-scattered inside a replica and all-reduced across replicas. Every rank
trains on its own share of the batch.

    dist_env = init_distributed()          # from torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    mesh = build_mesh(dims, dist_env.device)
    model = load_sharded_model(path, mesh, ShardingOptions(param_dtype=torch.bfloat16))

Only rank 0 reads the checkpoint's weights; the others build the model on the meta device and
receive their shards from rank 0, so a node never holds one full copy of the model per rank.

A job of one rank that computes in its master dtype trains the plain module: FSDP2 on a one-rank
mesh shards nothing, yet its unshard copies, gradient copies and DTensor dispatch cost ~18% of a
small model's step (bench/sft_throughput.py). Checkpoints, exports and weight sync take plain
tensors and DTensors alike, so a checkpoint written by one layout loads into the other.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, PreTrainedModel

from gantry.comm.store import SINGLE_NODE_HOST
from gantry.config.lora import LoraConfig
from gantry.launch.policy_job import job_store
from gantry.models.loading import auto_model_class
from gantry.run.runtime import RunInfo
from policy.lora import apply_lora

log = logging.getLogger("gantry.policy")
DEFAULT_TIMEOUT_S = 1800.0


class ParallelConfigError(ValueError):
    """The parallel layout asked for does not match the processes that were started."""


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the data-parallel mesh of the whole policy job."""

    dp_replicate: int  # replicas of the sharded model (policy replicas x dp_replicate_size)
    dp_shard: int  # ranks one copy of the model is sharded over

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ParallelConfigError(
                f"the policy job has {world_size} processes, but the config asks for "
                f"{self.dp_replicate} x {self.dp_shard} = {self.world_size} "
                "(policy.parallelism: n_init_replicas x dp_replicate_size x dp_shard_size); "
                "start that many policy processes or change policy.parallelism"
            )


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    timeout_s: float = DEFAULT_TIMEOUT_S, store: dist.Store | None = None
) -> DistEnv:
    """Join the policy job's default process group (NCCL on GPU, gloo on CPU).

    Under torchrun the rank and world come from its environment, and the group meets through
    `store` or, without one, torchrun's (MASTER_ADDR); a process started without torchrun
    forms a world of one, so the same code path trains one process.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if on_cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        device_id = device if on_cuda else None
        if store is not None:
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                device_id=device_id,
            )  # fmt: skip
        elif "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        else:  # a single process, no torchrun: an in-memory store is all a world of one needs
            if world_size != 1:
                raise ParallelConfigError(
                    f"WORLD_SIZE={world_size} but no MASTER_ADDR: start policy ranks with torchrun"
                )
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return DistEnv(rank, world_size, local_rank, device)


def join_policy_job(info: RunInfo, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """A rank of the run's policy job joins its default group: on one node through torchrun's
    agent store (127.0.0.1, MASTER_ADDR); across nodes through the run's Redis, with the
    run's secret (gantry.launch.policy_job), never through a TCPStore open to the network."""
    host = info.policy_master.rsplit(":", 1)[0]
    store = None
    if "MASTER_ADDR" in os.environ and info.policy_master and host != SINGLE_NODE_HOST:
        store = job_store(info, is_host=False, name="ranks", timeout_s=timeout_s)
    return init_distributed(timeout_s, store=store)


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh:
    """The data-parallel mesh: 1-D ("dp_shard",) without replication, else 2-D (HSDP)."""
    dims.check_world(dist.get_world_size())
    if dims.dp_replicate == 1:
        return init_device_mesh(device.type, (dims.dp_shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(
        device.type, (dims.dp_replicate, dims.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
    )


@dataclass(frozen=True)
class ShardingOptions:
    """How the model is held: dtypes, offload, activation checkpointing."""

    master_dtype: torch.dtype = torch.float32  # the sharded parameters the optimizer updates
    param_dtype: torch.dtype = torch.float32  # forward / backward compute
    reduce_dtype: torch.dtype = torch.float32  # gradient reduction across ranks
    cpu_offload: bool = False  # sharded parameters, gradients, optimizer state on the CPU
    gradient_checkpointing: bool = False
    reshard_after_forward: bool = True


def needs_fsdp(mesh: DeviceMesh, options: ShardingOptions) -> bool:
    """Whether FSDP2 has work to do: ranks to shard over, a compute dtype to cast the master
    weights to (its mixed precision), or parameters to offload from an accelerator."""
    offloads = options.cpu_offload and mesh.device_type != "cpu"
    return mesh.size() > 1 or options.param_dtype != options.master_dtype or offloads


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks at the next backward or not (accumulation); a plain
    module on one rank has nothing to reduce."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def shard_model(model: PreTrainedModel, mesh: DeviceMesh, options: ShardingOptions) -> None:
    """Apply FSDP2 in place: one unit per transformer block (the model's `_no_split_modules`),
    then the root, which holds the embeddings and the (possibly tied) LM head. Without
    `needs_fsdp` the model stays a plain module."""
    if options.gradient_checkpointing:
        # Non-reentrant: the reentrant form re-runs forward hooks, which FSDP2 relies on.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not needs_fsdp(mesh, options):
        return
    mixed = MixedPrecisionPolicy(
        param_dtype=None if options.param_dtype == options.master_dtype else options.param_dtype,
        reduce_dtype=options.reduce_dtype,
    )
    offload = OffloadPolicy()
    if options.cpu_offload and mesh.device_type == "cpu":
        # FSDP2's offload moves state between an accelerator and host memory; without an
        # accelerator everything already lives in host memory.
        log.info("fsdp_offload: no accelerator, the model already lives in CPU memory")
    elif options.cpu_offload:
        offload = CPUOffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mixed, offload_policy=offload)
    block_types = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no transformer block class in _no_split_modules; "
            "FSDP2 needs one unit per block to bound memory"
        )
    for block in blocks:
        fully_shard(block, reshard_after_forward=options.reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=options.reshard_after_forward, **kwargs)


def load_sharded_model(
    model_path: str, mesh: DeviceMesh, options: ShardingOptions, lora: LoraConfig | None = None
) -> PreTrainedModel:
    """Build the model sharded over `mesh`; only rank 0 reads the weights from `model_path`.
    With `lora` it is wrapped with LoRA adapters (policy.lora) before sharding; rank 0's
    initial adapters are broadcast with the weights, so every rank starts from the same."""
    rank = dist.get_rank()
    device = (
        torch.device(mesh.device_type, torch.cuda.current_device())
        if mesh.device_type == "cuda"
        else torch.device("cpu")
    )
    config = AutoConfig.from_pretrained(model_path)
    model_class = auto_model_class(config)
    if rank == 0:
        model = model_class.from_pretrained(model_path, dtype=options.master_dtype)
        model = apply_lora(model, lora) if lora is not None else model
        full_state = model.state_dict()
    else:
        with torch.device("meta"):
            model = model_class.from_config(config, dtype=options.master_dtype)
            model = apply_lora(model, lora) if lora is not None else model
        full_state = {}
    buffers = {name: buf.clone() for name, buf in model.named_buffers()} if rank == 0 else None
    shard_model(model, mesh, options)
    if rank != 0:
        model.to_empty(device="cpu" if options.cpu_offload else device)
    elif not options.cpu_offload:
        model.to(device)
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, cpu_offload=options.cpu_offload
        ),
    )
    _broadcast_buffers(model, buffers, device)
    model.train()
    return model


def _broadcast_buffers(
    model: torch.nn.Module, source: dict[str, torch.Tensor] | None, device: torch.device
) -> None:
    """Buffers are not sharded and some are not in the state dict (rotary frequencies): the
    meta-built ranks get them from rank 0."""
    for name, buf in model.named_buffers():
        value = (
            source[name].to(device) if source is not None else torch.empty_like(buf, device=device)
        )
        if dist.get_world_size() > 1:
            dist.broadcast(value, src=0)
        with torch.no_grad():
            buf.copy_(value)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a parameter: all-gathered (a collective) if it is sharded."""
    with torch.no_grad():
        return value.full_tensor() if isinstance(value, DTensor) else value.detach()
