"""Weight sync transport: a process group formed at run time, and bucketed broadcasts.

The policy (rank 0) and every rollout rank form a group through a TCPStore hosted by the policy
at the address the controller published in Redis, without restarting any process: gloo on CPU,
NCCL on GPU. Parameters travel in the order of a name/shape/dtype manifest, packed into
dtype-grouped buckets of bounded size (one flat tensor per bucket, one broadcast each).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gantry.protocol import Keys
from gantry.transport import ControlPlane

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


def backend_for_device() -> str:
    # "cpu:gloo,cuda:nccl" fails on the CPU wheel, so choose by what the machine has.
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class SyncGroup:
    """A process group and the store it was formed through (which must outlive it)."""

    group: dist.ProcessGroup
    store: dist.Store

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        # On the object: dist.broadcast(group=...) rejects a group it did not register.
        self.group.broadcast(tensor, root).wait()


def create_group(
    host: str,
    port: int,
    rank: int,
    world_size: int,
    *,
    prefix: str,
    timeout_s: float = 600.0,
    backend: str | None = None,
) -> SyncGroup:
    """Join the weight-sync group; rank 0 hosts the store. Blocks until all ranks joined."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        host, port, world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False
    )
    prefixed = dist.PrefixStore(prefix, store)
    backend = backend or backend_for_device()
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return SyncGroup(group, store)


def join_group(plane: ControlPlane, keys: Keys, rank: int) -> SyncGroup:
    """Form the weight-sync group at the address the controller published in Redis."""
    fields = plane.redis.hgetall(keys.rendezvous)
    if not fields:
        raise RuntimeError("no weight-sync rendezvous in Redis: the controller publishes it first")
    rdv = {k.decode(): v.decode() for k, v in fields.items()}
    return create_group(
        rdv["host"], int(rdv["port"]), rank, int(rdv["world_size"]), prefix=rdv["prefix"]
    )


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def manifest_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[ManifestEntry]:
    return [
        ManifestEntry(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in named_tensors
    ]


def publish_manifest(
    plane: ControlPlane, keys: Keys, manifest: list[ManifestEntry], bucket_bytes: int
) -> None:
    entries = [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype} for e in manifest]
    plane.redis.set(keys.manifest, json.dumps({"bucket_bytes": bucket_bytes, "entries": entries}))


def read_manifest(plane: ControlPlane, keys: Keys) -> tuple[list[ManifestEntry], int]:
    raw = plane.redis.get(keys.manifest)
    if raw is None:
        raise RuntimeError("no weight manifest in Redis: the policy publishes it at start-up")
    data = json.loads(raw)
    entries = [ManifestEntry(e["name"], tuple(e["shape"]), e["dtype"]) for e in data["entries"]]
    return entries, data["bucket_bytes"]


def plan_buckets(
    manifest: list[ManifestEntry], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[list[ManifestEntry]]:
    """Split the manifest into same-dtype buckets of at most `bucket_bytes` (or one tensor)."""
    buckets: list[list[ManifestEntry]] = []
    current: dict[str, tuple[list[ManifestEntry], int]] = {}
    for entry in manifest:
        size = entry.numel * entry.torch_dtype.itemsize
        bucket, used = current.get(entry.dtype, ([], 0))
        if bucket and used + size > bucket_bytes:
            buckets.append(bucket)
            bucket, used = [], 0
        current[entry.dtype] = (bucket + [entry], used + size)
    buckets.extend(bucket for bucket, _ in current.values() if bucket)
    return buckets


def send_weights(
    group: SyncGroup,
    tensors: dict[str, torch.Tensor],
    buckets: list[list[ManifestEntry]],
) -> None:
    """Broadcast `tensors` from rank 0 bucket by bucket, in manifest order."""
    for bucket in buckets:
        broadcast_bucket(group, [tensors[e.name] for e in bucket])


def broadcast_bucket(group: SyncGroup, tensors: list[torch.Tensor]) -> None:
    """Send one bucket (its tensors in manifest order) as one flat broadcast from rank 0."""
    group.broadcast(torch.cat([t.detach().reshape(-1) for t in tensors]))


def receive_weights(
    group: SyncGroup,
    buckets: list[list[ManifestEntry]],
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receive the broadcast of `send_weights`; yields (name, tensor) as buckets arrive."""
    for bucket in buckets:
        numel = sum(e.numel for e in bucket)
        flat = torch.empty(numel, dtype=bucket[0].torch_dtype, device=device)
        group.broadcast(flat)
        offset = 0
        for entry in bucket:
            yield entry.name, flat[offset : offset + entry.numel].view(entry.shape)
            offset += entry.numel
