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
checks in at the store, so a sync that stalls names the ranks that did not arrive. When a
group forms, its members time one plain broadcast over it (`_probe`): the baseline that the
policy's `weight_sync_efficiency` metric compares each sync's throughput with.

This module owns the transfer (`Sender`, `Receiver`, `WeightReceiver`); the manifest and bucket
layouts are in `gantry.comm.manifest`, the groups, store and check-in in `gantry.comm.sync_groups`.
Every name of those two that callers use is re-exported here (`gantry.comm.weights.Manifest`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from gantry.comm.manifest import (
    DEFAULT_BUCKET_BYTES,
    DIRECT_MIN_BYTES,
    PIPELINE_DEPTH,
    Arena,
    BucketLayout,
    Manifest,
    ManifestEntry,
    even_splits,
    layer_of,
    pipeline_arenas,
    plan_buckets,
    rows_of,
)
from gantry.comm.protocol import SyncPlan
from gantry.comm.sync_groups import (
    CALLED_OFF_POLL_S,
    SyncCancelled,
    SyncGroup,
    SyncStalled,
    backend_for_device,
    call_off,
    check_in,
    connect_store,
    create_group,
    is_called_off,
    member_names,
    receiver_name,
    sender_name,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DIRECT_MIN_BYTES",
    "PIPELINE_DEPTH",
    "Arena",
    "BucketLayout",
    "Manifest",
    "ManifestEntry",
    "Receiver",
    "SendStats",
    "Sender",
    "SyncCancelled",
    "SyncGroup",
    "SyncStalled",
    "WeightReceiver",
    "backend_for_device",
    "call_off",
    "check_in",
    "connect_store",
    "create_group",
    "even_splits",
    "is_called_off",
    "layer_of",
    "member_names",
    "plan_buckets",
    "receive_and_load",
    "receiver_name",
    "rows_of",
    "sender_name",
]


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


# ---------------------------------------------------------------------------------------------
# Sending (a policy rank holding shard `sender` of every entry)


# The most bytes of the plain broadcast a sender times when its group forms (`probe_numel`).
PROBE_MAX_BYTES = 64 << 20
PROBE_ROUNDS = 3


@dataclass(frozen=True)
class SendStats:
    bytes: int
    wait_s: float  # until every member checked in (receivers finishing a generate call)
    send_s: float  # the transfer itself
    setup_s: float = 0.0  # forming the group and timing the probe (a plan's first sync only)
    raw_gbps: float = 0.0  # the probe: a plain broadcast over the same group (`_probe`)


class Sender:
    """One policy rank's side of the syncs: its group with all receivers, per plan."""

    def __init__(self, manifest: Manifest, sender: int, store: dist.Store) -> None:
        self.manifest, self.sender, self.store = manifest, sender, store
        self.groups: dict[str, SyncGroup] = {}
        self.raw_gbps: dict[str, float] = {}  # per plan: its probe's GB/s
        self.arenas = pipeline_arenas(_device())

    def send(
        self,
        plan: SyncPlan,
        version: int,
        local_rows: Callable[[ManifestEntry], torch.Tensor],
        called_off: Callable[[], bool] | None = None,
    ) -> SendStats:
        """Broadcast this rank's rows of every entry (SyncCancelled if `called_off`)."""
        started = time.perf_counter()
        me = sender_name(self.sender)
        check_in(self.store, plan, self.manifest.senders, me, version, called_off)
        arrived = time.perf_counter()

        def cancelled() -> bool:
            if called_off is not None and called_off():
                call_off(self.store, plan, version)
            return is_called_off(self.store, plan, version)

        group, formed = self.groups.get(plan.group), arrived
        if group is None:
            world = 1 + plan.receiver_ranks
            prefix = f"{plan.group}/from{self.sender}"
            group = self.groups[plan.group] = create_group(
                self.store, prefix, 0, world, plan.timeout_s
            )
            numel = probe_numel(self.manifest, self.sender)
            self.raw_gbps[plan.group] = _probe([group], [numel], _device(), cancelled, version)
            formed = time.perf_counter()
        in_flight: deque[list[dist.Work]] = deque()
        sent = 0
        try:
            for i, bucket in enumerate(self.manifest.buckets):
                if len(in_flight) == PIPELINE_DEPTH:  # the arena of bucket i - DEPTH is free
                    _wait(in_flight.popleft(), cancelled, version)
                tensors = self._outgoing(bucket, self.arenas[i % PIPELINE_DEPTH], local_rows)
                in_flight.append([group.broadcast(t) for t in tensors])
                sent += sum(t.numel() * t.element_size() for t in tensors)
            while in_flight:
                _wait(in_flight.popleft(), cancelled, version)
        except SyncCancelled:
            self.arenas = pipeline_arenas(_device())  # the abandoned broadcasts keep the old
            raise
        raw = self.raw_gbps.get(plan.group, 0.0)
        return SendStats(
            sent, arrived - started, time.perf_counter() - formed, formed - arrived, raw
        )

    def call_off(self, plan: SyncPlan, version: int) -> None:
        """Release the receivers of a transfer that broke (see `call_off`)."""
        call_off(self.store, plan, version)

    def _outgoing(
        self,
        bucket: BucketLayout,
        arena: Arena,
        local_rows: Callable[[ManifestEntry], torch.Tensor],
    ) -> list[torch.Tensor]:
        """This sender's broadcasts of `bucket`, in the order receivers post them."""
        me = self.sender
        directs = [
            bucket.entries[i].splits[me] * bucket.entries[i].row_numel for i in bucket.directs(me)
        ]
        arena.reset(Arena.span([bucket.packed_numel(me), *directs], bucket.dtype))
        out = []
        packed = bucket.packed(me)
        if packed:
            flat = arena.take(bucket.packed_numel(me), bucket.dtype)
            offset = 0
            for i in packed:
                rows = local_rows(bucket.entries[i]).reshape(-1)
                flat[offset : offset + rows.numel()].copy_(rows)  # casts to the transfer dtype
                offset += rows.numel()
            out.append(flat)
        for i in bucket.directs(me):
            rows = local_rows(bucket.entries[i])
            if rows.dtype != bucket.dtype or not rows.is_contiguous():
                rows = arena.take(rows.numel(), bucket.dtype).copy_(rows.reshape(-1))
            out.append(rows.reshape(-1))  # the shard itself: no copy
        return out


def probe_numel(manifest: Manifest, sender: int) -> int:
    """float32 elements of the probe of `sender`'s group: the bytes of its share of a sync,
    at most PROBE_MAX_BYTES (senders and receivers compute it alike from the manifest)."""
    share = sum(e.splits[sender] * e.row_numel * e.torch_dtype.itemsize for e in manifest.entries)
    return max(1, min(share, PROBE_MAX_BYTES) // 4)


def _probe(
    groups: list[SyncGroup],
    numels: list[int],
    device: torch.device,
    cancelled: Callable[[], bool],
    version: int,
) -> float:
    """GB/s of a plain broadcast of `numels[i]` float32 over each of `groups` at once, timed
    here: the baseline of the sync's efficiency metric. Every member of a group calls it once,
    right after the group forms (the receivers for all senders' groups together, as in a sync).
    A one-element broadcast first sets up NCCL's communicator, which is not bandwidth; the
    best of PROBE_ROUNDS rounds is kept (a first transfer pays one-time costs)."""
    cuda = device.type == "cuda"
    warm = [torch.zeros(1, device=device) for _ in groups]
    _wait([g.broadcast(t) for g, t in zip(groups, warm, strict=True)], cancelled, version)
    buffers = [torch.empty(n, device=device) for n in numels]
    best = float("inf")
    for _ in range(PROBE_ROUNDS):
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        _wait([g.broadcast(b) for g, b in zip(groups, buffers, strict=True)], cancelled, version)
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return sum(numels) * 4 / 1e9 / max(best, 1e-9)


def _wait(works: list[dist.Work], cancelled: Callable[[], bool], version: int) -> None:
    """Until `works` are done, or SyncCancelled once `cancelled()` says the sync was called off:
    when a member dies mid-transfer, a survivor's broadcast may wait on data that never comes
    until the group's timeout (rollout.weight_sync_timeout). Woken by the works' completion,
    not by polling them, so a finished transfer costs no extra latency."""
    done = threading.Event()
    torch.futures.collect_all([w.get_future() for w in works]).add_done_callback(
        lambda _: done.set()
    )
    while not done.wait(CALLED_OFF_POLL_S):
        if cancelled():
            raise SyncCancelled(
                f"weight sync v{version} was called off by the controller during the "
                "transfer: a member left the run"
            )
    for work in works:
        work.wait()  # raises what a failed broadcast raised


# ---------------------------------------------------------------------------------------------
# Receiving (every TP rank of every rollout replica)


class Receiver:
    """One rollout rank's side of the syncs: a group with each sender, per plan."""

    def __init__(self, manifest: Manifest, store: dist.Store, device: torch.device | str) -> None:
        self.manifest, self.store, self.device = manifest, store, torch.device(device)
        self.groups: dict[str, list[SyncGroup]] = {}
        self.arenas = pipeline_arenas(self.device)

    def receive(
        self, plan: SyncPlan, version: int, replica: str, tp_rank: int
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield each bucket's (name, full tensor) pairs as they arrive. The tensors are views
        of a buffer that the bucket after next reuses: load or copy them before asking for
        more. Consume to the end: the senders block until every receiver took every bucket."""
        me = receiver_name(replica, tp_rank)
        check_in(self.store, plan, self.manifest.senders, me, version)
        formed = plan.group in self.groups
        groups = self._groups(plan, plan.rank_of(replica, tp_rank))
        if not formed:  # join each sender's probe (`_probe`)
            numels = [probe_numel(self.manifest, s) for s in range(len(groups))]
            called_off = partial(is_called_off, self.store, plan, version)
            _probe(groups, numels, self.device, called_off, version)
        buckets = self.manifest.buckets
        pending = deque(self._post(groups, i) for i in range(min(PIPELINE_DEPTH, len(buckets))))
        for i, bucket in enumerate(buckets):
            works, full, staging = pending.popleft()
            try:
                _wait(works, lambda: is_called_off(self.store, plan, version), version)
            except SyncCancelled:
                self.arenas = pipeline_arenas(self.device)  # the abandoned receives keep the old
                raise
            _unpack(bucket, full, staging)
            yield [
                (e.name, full[off : off + e.numel].view(e.shape))
                for e, off in zip(bucket.entries, bucket.offsets, strict=True)
            ]
            if i + PIPELINE_DEPTH < len(buckets):  # into the arena bucket i just released
                pending.append(self._post(groups, i + PIPELINE_DEPTH))

    def _groups(self, plan: SyncPlan, rank: int) -> list[SyncGroup]:
        if plan.group not in self.groups:
            world = 1 + plan.receiver_ranks
            self.groups[plan.group] = [
                create_group(self.store, f"{plan.group}/from{s}", rank, world, plan.timeout_s)
                for s in range(self.manifest.senders)
            ]
        return self.groups[plan.group]

    def _post(self, groups: list[SyncGroup], index: int):
        """Post the receives of bucket `index`: direct rows into their place in the bucket's
        layout, packed rows into one staging tensor per sender."""
        bucket = self.manifest.buckets[index]
        arena = self.arenas[index % PIPELINE_DEPTH]
        packed = [bucket.packed_numel(s) for s in range(bucket.senders)]
        arena.reset(Arena.span([bucket.numel, *packed], bucket.dtype))
        full = arena.take(bucket.numel, bucket.dtype)
        staging = [arena.take(n, bucket.dtype) for n in packed]
        works = []
        for sender, group in enumerate(groups):
            if packed[sender]:
                works.append(group.broadcast(staging[sender]))
            for i in bucket.directs(sender):
                start = bucket.rows_start(i, sender)
                n = bucket.entries[i].splits[sender] * bucket.entries[i].row_numel
                works.append(group.broadcast(full[start : start + n]))
        return works, full, staging


def _unpack(bucket: BucketLayout, full: torch.Tensor, staging: list[torch.Tensor]) -> None:
    """Copy each sender's packed rows of the small entries to their place in `full`."""
    for sender, flat in enumerate(staging):
        offset = 0
        for i in bucket.packed(sender):
            start = bucket.rows_start(i, sender)
            n = bucket.entries[i].splits[sender] * bucket.entries[i].row_numel
            full[start : start + n].copy_(flat[offset : offset + n])
            offset += n


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
    buckets = receiver.receive(plan, version, replica, tp_rank)
    try:
        for weights in buckets:
            load(weights)
    finally:
        for _ in buckets:  # drain what is left: a no-op once the transfer ended or failed
            pass


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
