"""The policy's side of weight sync: the manifest of its FSDP shards, and sending them.

The senders are the ranks of the first data-parallel replica (replicate coordinate 0), one
per FSDP shard: each sends the rows of every parameter it holds, cast to the rollout dtype,
straight from its shard (`DTensor.to_local`), so no rank gathers a parameter. The other
replicas hold copies of the same shards and sit syncs out. Policy rank 0 hosts the store the
sync groups meet through. With `rollout.weight_sync_in_background` a sender copies its rows when
the sync is ordered and sends the copy from a thread while the policy trains the next step.
With LoRA (policy.lora) the tensors sent are the merged weights, computed on every rank at each
sync (policy.lora.merged_parameters): the manifest is the base model's, as without LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from gantry.comm import weights as communicator
from gantry.comm.protocol import SyncPlan
from gantry.comm.weights import Manifest, ManifestEntry


def shard_position(mesh: DeviceMesh) -> tuple[int, int, bool]:
    """(this rank's shard index, number of shards, whether it is a sender)."""
    names = mesh.mesh_dim_names or ()
    coordinate = mesh.get_coordinate() or [0] * mesh.ndim
    position = dict(zip(names, coordinate, strict=True))
    shards = mesh["dp_shard"].size() if "dp_shard" in names else 1
    return position.get("dp_shard", 0), shards, position.get("dp_replicate", 0) == 0


def build_manifest(
    params: dict[str, torch.Tensor],
    senders: int,
    dtype: str,
    bucket_bytes: int,
    direct_min_bytes: int = communicator.DIRECT_MIN_BYTES,
) -> Manifest:
    entries = []
    for name, param in params.items():
        rows = communicator.rows_of(param.shape)
        if _row_sharded(param):
            splits = communicator.even_splits(rows, senders)
        else:  # whole on every rank: the first sender sends it
            splits = (rows,) + (0,) * (senders - 1)
        entries.append(ManifestEntry(name, tuple(param.shape), dtype, splits))
    return Manifest(entries, senders, bucket_bytes, direct_min_bytes)


def _row_sharded(param: torch.Tensor) -> bool:
    if not isinstance(param, DTensor):
        return False
    shards = [p for p in param.placements if not p.is_replicate()]
    if any(not (isinstance(p, Shard) and p.dim == 0) for p in shards):
        raise ValueError(f"weight sync sends row shards, but a parameter is {param.placements}")
    return bool(shards)


class PolicySender:
    """Sends this rank's shards at each SyncWeights; a no-op on ranks that are not senders."""

    def __init__(
        self,
        params: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]],
        mesh: DeviceMesh,
        *,
        dtype: str,
        is_store_host: bool,
        bucket_bytes: int = communicator.DEFAULT_BUCKET_BYTES,
        direct_min_bytes: int = communicator.DIRECT_MIN_BYTES,
    ) -> None:
        # A function (LoRA: the merged weights) is called again at each sync, on every rank:
        # it may be a collective, and its tensors keep the names, shapes and layout it had.
        self.source = params if callable(params) else None
        self.params = params() if callable(params) else params
        self.index, senders, self.is_sender = shard_position(mesh)
        self.manifest = build_manifest(self.params, senders, dtype, bucket_bytes, direct_min_bytes)
        self.is_store_host = is_store_host
        self.sender: communicator.Sender | None = None
        self.snapshot: dict[str, torch.Tensor] = {}
        # One worker: a background sync and then its report run in order, one sync at a time.
        self.pool: ThreadPoolExecutor | None = None
        self.sending: Future[None] | None = None  # the report of the sync in flight

    def send(
        self, plan: SyncPlan, version: int, called_off: Callable[[], bool] | None = None
    ) -> communicator.SendStats | None:
        """Take part in the sync `plan` (None on ranks that are not senders); SyncCancelled
        when `called_off` says the controller gave it up."""
        self._refresh()
        return self._send(plan, version, called_off, self._local_rows)

    def send_in_background(
        self,
        plan: SyncPlan,
        version: int,
        called_off: Callable[[], bool],
        done: Callable[[communicator.SendStats | None, BaseException | None], None],
    ) -> None:
        """Copy this rank's rows now (in the transfer dtype, into buffers kept between syncs)
        and send the copy from a thread, so that training goes on while the receivers finish
        their generate calls. One sync at a time: this waits for the previous one first.
        `done(stats, error)` is called from the thread (error: SyncCancelled, or what failed)."""
        self.wait()
        self._refresh()
        if not self.is_sender:
            return
        for entry in self.manifest.entries:
            rows = self._local_rows(entry)
            held = self.snapshot.get(entry.name)
            if held is None:
                held = self.snapshot[entry.name] = torch.empty_like(rows, dtype=entry.torch_dtype)
            held.copy_(rows)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        copy = self.snapshot  # what the thread sends: training goes on with the shards
        sent = self.pool.submit(self._send, plan, version, called_off, lambda e: copy[e.name])
        # The future carries the send's stats, or the exception it raised, to `done`.
        self.sending = self.pool.submit(_report, sent, done)

    def call_off(self, plan: SyncPlan, version: int) -> None:
        """Release the receivers of a transfer that broke off (a no-op on ranks that are not
        senders, or that never connected)."""
        if self.sender is not None:
            self.sender.call_off(plan, version)

    def wait(self) -> None:
        """Until the sync in flight (if any) is over and reported to `done`."""
        if self.sending is not None:
            sending, self.sending = self.sending, None
            sending.result()  # raises only what `done` itself raised

    def _refresh(self) -> None:
        if self.source is not None:
            self.params = self.source()

    def _send(
        self,
        plan: SyncPlan,
        version: int,
        called_off: Callable[[], bool] | None,
        local_rows: Callable[[ManifestEntry], torch.Tensor],
    ) -> communicator.SendStats | None:
        if not self.is_sender:
            return None
        if self.sender is None:
            store = communicator.connect_store(
                plan.host, plan.port, host_it=self.is_store_host, timeout_s=plan.timeout_s
            )
            self.sender = communicator.Sender(self.manifest, self.index, store)
        return self.sender.send(plan, version, local_rows, called_off)

    def _local_rows(self, entry: ManifestEntry) -> torch.Tensor:
        """This rank's rows of `entry`, straight from its shard (no copy)."""
        param = self.params[entry.name]
        local = param.to_local() if isinstance(param, DTensor) else param
        local = local.detach()
        rows, expected = communicator.rows_of(local.shape), entry.splits[self.index]
        if rows != expected:
            raise RuntimeError(
                f"weight sync: {entry.name} holds {rows} rows on shard {self.index}, "
                f"the manifest says {expected}"
            )
        return local


def _report(
    sent: Future[communicator.SendStats | None],
    done: Callable[[communicator.SendStats | None, BaseException | None], None],
) -> None:
    """Hand a finished background send's outcome to `done` (run after it, on the same thread)."""
    error = sent.exception()
    done(None if error is not None else sent.result(), error)
