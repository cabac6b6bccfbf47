"""Weight sync transport: policy shards broadcast to every rollout rank over torch.distributed.

The policy's weights live in FSDP shards: rows of dim 0 spread over `senders` ranks. Each
sender broadcasts its own rows, never gathering the model anywhere, in its own process group
whose other members are all the receiving ranks (every tensor-parallel rank of every rollout
replica), so each byte leaves the policy once and the senders' broadcasts run side by side.
Receivers put the rows of each tensor back together and hand full tensors to the engine, whose
weight loaders slice them for their TP rank.

Parameters travel in the order of a `Manifest` (name, shape, transfer dtype, rows per sender)
that the policy publishes once, packed into same-dtype buckets of bounded size: one flat
tensor per sender per bucket, one broadcast each, the next bucket posted before the current
one is unpacked. Groups are formed at run time through a TCPStore hosted by policy rank 0 at
the address in the `SyncPlan`, gloo on CPU and NCCL on GPU. Before each sync every member
checks in at the store, so a sync that stalls names the ranks that did not arrive.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from gantry.protocol import SyncPlan

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
# Buckets in flight per sender: one broadcasting while the next one is packed.
PIPELINE_DEPTH = 2


class SyncStalled(RuntimeError):
    """Members of a weight sync did not arrive in time."""


def backend_for_device() -> str:
    # "cpu:gloo,cuda:nccl" fails on the CPU wheel, so choose by what the machine has.
    return "nccl" if torch.cuda.is_available() else "gloo"


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # the transfer dtype, e.g. "bfloat16"
    splits: tuple[int, ...]  # rows of dim 0 held by each sender, in sender order

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Manifest:
    """What a sync sends, agreed once: entries in order, the senders and the bucket size."""

    entries: list[ManifestEntry]
    senders: int
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    buckets: list[list[ManifestEntry]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        for e in self.entries:
            rows = e.shape[0] if e.shape else 1
            if len(e.splits) != self.senders or sum(e.splits) != rows:
                raise ValueError(f"{e.name}: splits {e.splits} do not cover {rows} rows")
        object.__setattr__(self, "buckets", plan_buckets(self.entries, self.bucket_bytes))

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def to_json(self) -> str:
        entries = [[e.name, list(e.shape), e.dtype, list(e.splits)] for e in self.entries]
        return json.dumps(
            {"senders": self.senders, "bucket_bytes": self.bucket_bytes, "entries": entries}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        data = json.loads(text)
        entries = [
            ManifestEntry(name, tuple(shape), dtype, tuple(splits))
            for name, shape, dtype, splits in data["entries"]
        ]
        return cls(entries, data["senders"], data["bucket_bytes"])


def even_splits(rows: int, senders: int) -> tuple[int, ...]:
    """Rows per shard when `rows` are cut like FSDP2's Shard(0) (torch.chunk: ceil-sized)."""
    size = -(-rows // senders) if rows else 0
    return tuple(max(0, min(size, rows - i * size)) for i in range(senders))


def plan_buckets(
    entries: list[ManifestEntry], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[list[ManifestEntry]]:
    """Split the entries into same-dtype buckets of at most `bucket_bytes` (or one tensor)."""
    buckets: list[list[ManifestEntry]] = []
    current: dict[str, tuple[list[ManifestEntry], int]] = {}
    for entry in entries:
        bucket, used = current.get(entry.dtype, ([], 0))
        if bucket and used + entry.nbytes > bucket_bytes:
            buckets.append(bucket)
            bucket, used = [], 0
        current[entry.dtype] = (bucket + [entry], used + entry.nbytes)
    buckets.extend(bucket for bucket, _ in current.values() if bucket)
    return buckets


def part_numel(bucket: list[ManifestEntry], sender: int) -> int:
    return sum(e.splits[sender] * e.row_numel for e in bucket)


# ---------------------------------------------------------------------------------------------
# Process groups


@dataclass
class SyncGroup:
    """A process group and the store it was formed through (which must outlive it)."""

    group: dist.ProcessGroup
    store: dist.Store

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> dist.Work:
        # On the object: dist.broadcast(group=...) rejects a group it did not register.
        return self.group.broadcast(tensor, root)


def create_group(
    store: dist.Store, prefix: str, rank: int, world_size: int, timeout_s: float
) -> SyncGroup:
    """A process group of `world_size` members meeting under `prefix` in `store`."""
    prefixed = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    if backend_for_device() == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return SyncGroup(group, store)


def connect_store(host: str, port: int, *, host_it: bool, timeout_s: float) -> dist.Store:
    """The sync store: policy rank 0 hosts it, every other member connects to it."""
    return dist.TCPStore(
        host,
        port,
        is_master=host_it,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def member_names(plan: SyncPlan, senders: int) -> list[str]:
    names = [f"policy sender {s}" for s in range(senders)]
    for receiver in plan.receivers:
        names += [f"rollout replica {receiver.replica} tp rank {t}" for t in range(receiver.ranks)]
    return names


def check_in(store: dist.Store, plan: SyncPlan, senders: int, me: str, version: int) -> None:
    """Announce `me` for this sync and wait for every other member, naming those missing."""
    prefix = f"{plan.group}/v{version}/"
    store.set(prefix + me, "1")
    names = member_names(plan, senders)
    deadline = time.monotonic() + plan.timeout_s
    while True:
        missing = [n for n in names if not store.check([prefix + n])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SyncStalled(
                f"weight sync v{version} ({plan.group}): {', '.join(missing)} did not arrive "
                f"within {plan.timeout_s:.0f}s (rollout.weight_sync_timeout); {me} gave up"
            )
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Sending (a policy rank holding shard `sender` of every entry)


@dataclass(frozen=True)
class SendStats:
    bytes: int
    wait_s: float  # until every member checked in (receivers finishing a generate call)
    send_s: float  # the transfer itself, group formation included on a plan's first sync


class Sender:
    """One policy rank's side of the syncs: its group with all receivers, per plan."""

    def __init__(self, manifest: Manifest, sender: int, store: dist.Store) -> None:
        self.manifest, self.sender, self.store = manifest, sender, store
        self.groups: dict[str, SyncGroup] = {}

    def send(
        self, plan: SyncPlan, version: int, local_rows: Callable[[ManifestEntry], torch.Tensor]
    ) -> SendStats:
        """Broadcast this rank's rows of every entry."""
        started = time.perf_counter()
        check_in(self.store, plan, self.manifest.senders, f"policy sender {self.sender}", version)
        arrived = time.perf_counter()
        group = self.groups.get(plan.group)
        if group is None:
            world = 1 + plan.receiver_ranks
            prefix = f"{plan.group}/from{self.sender}"
            group = self.groups[plan.group] = create_group(
                self.store, prefix, 0, world, plan.timeout_s
            )
        in_flight: list[tuple[dist.Work, torch.Tensor]] = []
        sent = 0
        for bucket in self.manifest.buckets:
            if part_numel(bucket, self.sender) == 0:
                continue
            parts = [local_rows(e).reshape(-1) for e in bucket if e.splits[self.sender]]
            flat = torch.cat(parts).to(bucket[0].torch_dtype)
            in_flight.append((group.broadcast(flat), flat))
            sent += flat.numel() * flat.element_size()
            if len(in_flight) >= PIPELINE_DEPTH:
                in_flight.pop(0)[0].wait()
        for work, _ in in_flight:
            work.wait()
        return SendStats(sent, arrived - started, time.perf_counter() - arrived)


# ---------------------------------------------------------------------------------------------
# Receiving (every TP rank of every rollout replica)


class Receiver:
    """One rollout rank's side of the syncs: a group with each sender, per plan."""

    def __init__(self, manifest: Manifest, store: dist.Store, device: torch.device | str) -> None:
        self.manifest, self.store, self.device = manifest, store, torch.device(device)
        self.groups: dict[str, list[SyncGroup]] = {}

    def receive(
        self, plan: SyncPlan, version: int, replica: str, tp_rank: int
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield each bucket's (name, full tensor) pairs as they arrive. Consume it to the end:
        the senders block until every receiver took every bucket."""
        me = f"rollout replica {replica} tp rank {tp_rank}"
        check_in(self.store, plan, self.manifest.senders, me, version)
        groups = self._groups(plan, plan.rank_of(replica, tp_rank))
        buckets = self.manifest.buckets
        pending = [self._post(groups, b) for b in buckets[:PIPELINE_DEPTH]]
        for i, bucket in enumerate(buckets):
            works, parts = pending.pop(0)
            for work in works:
                work.wait()
            if i + PIPELINE_DEPTH < len(buckets):
                pending.append(self._post(groups, buckets[i + PIPELINE_DEPTH]))
            yield list(_assemble(bucket, parts))

    def _groups(self, plan: SyncPlan, rank: int) -> list[SyncGroup]:
        if plan.group not in self.groups:
            world = 1 + plan.receiver_ranks
            self.groups[plan.group] = [
                create_group(self.store, f"{plan.group}/from{s}", rank, world, plan.timeout_s)
                for s in range(self.manifest.senders)
            ]
        return self.groups[plan.group]

    def _post(self, groups: list[SyncGroup], bucket: list[ManifestEntry]):
        dtype = bucket[0].torch_dtype
        parts, works = [], []
        for sender, group in enumerate(groups):
            part = torch.empty(part_numel(bucket, sender), dtype=dtype, device=self.device)
            parts.append(part)
            if part.numel():
                works.append(group.broadcast(part))
        return works, parts


def _assemble(
    bucket: list[ManifestEntry], parts: list[torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Cut each sender's flat part into its rows of each entry and join them per entry."""
    offsets = [0] * len(parts)
    for entry in bucket:
        pieces = []
        for sender, rows in enumerate(entry.splits):
            n = rows * entry.row_numel
            if n:
                pieces.append(parts[sender][offsets[sender] : offsets[sender] + n])
            offsets[sender] += n
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        yield entry.name, flat.view(entry.shape)


def receive_and_load(
    receiver: Receiver,
    plan: SyncPlan,
    version: int,
    replica: str,
    tp_rank: int,
    load: Callable[[list[tuple[str, torch.Tensor]]], None],
) -> None:
    """Receive a sync and `load` it bucket by bucket. If loading fails, the rest is still
    received (so the senders and other receivers are not left blocked), then the error raised."""
    error: Exception | None = None
    for weights in receiver.receive(plan, version, replica, tp_rank):
        if error is None:
            try:
                load(weights)
            except Exception as exc:  # re-raised below, once the broadcast is drained
                error = exc
    if error is not None:
        raise error


class WeightReceiver:
    """A rollout rank's receiver across syncs: the store connection and groups are made at
    the first sync and kept; a new manifest (a restarted policy) starts afresh."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.manifest_text: str | None = None
        self.receiver: Receiver | None = None

    def receive(
        self,
        plan: SyncPlan,
        manifest: str,
        version: int,
        replica: str,
        tp_rank: int,
        load: Callable[[list[tuple[str, torch.Tensor]]], None],
    ) -> None:
        if self.receiver is None or manifest != self.manifest_text:
            store = connect_store(plan.host, plan.port, host_it=False, timeout_s=plan.timeout_s)
            self.receiver = Receiver(Manifest.from_json(manifest), store, self.device)
            self.manifest_text = manifest
        receive_and_load(self.receiver, plan, version, replica, tp_rank, load)
