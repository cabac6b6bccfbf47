"""Weight sync from FSDP2 shards over real gloo process groups between separate processes.

The policy ranks (torchrun, FSDP2 and HSDP) send their shards; rollout replicas (transformers
engines, each its own process) receive them. After each sync every replica in it holds
exactly the weights the policy sent, and a replica left out of a sync keeps what it had.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gantry.comm import weights as communicator
from gantry.comm.protocol import Receiver, SyncPlan
from gantry.comm.weights import Manifest, ManifestEntry, SyncCancelled, SyncStalled
from gantry.launch.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "tests" / "sync_peers.py"


def make_plan(port: int, replicas: dict[str, int], group: str, timeout_s: float = 120.0):
    receivers = [Receiver(replica=r, ranks=n) for r, n in replicas.items()]
    return SyncPlan(
        group=group, host="127.0.0.1", port=port, receivers=receivers, timeout_s=timeout_s
    )


# --------------------------------------------------------------------------------------------
# The manifest


def test_even_splits_cut_rows_like_torch_chunk():
    for rows in (0, 1, 5, 8, 9, 151):
        for senders in (1, 2, 3, 4):
            expected = [len(c) for c in torch.arange(rows).chunk(senders)] if rows else []
            expected += [0] * (senders - len(expected))
            assert list(communicator.even_splits(rows, senders)) == expected, (rows, senders)


def test_manifest_round_trips_and_checks_its_splits():
    manifest = Manifest(
        [
            ManifestEntry("w", (5, 3), "bfloat16", (3, 2)),
            ManifestEntry("b", (5,), "float32", (5, 0)),
        ],
        senders=2,
        bucket_bytes=1024,
    )
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.total_bytes == 5 * 3 * 2 + 5 * 4
    with pytest.raises(ValueError, match="do not cover 5 rows"):
        Manifest([ManifestEntry("w", (5, 3), "float32", (3, 1))], senders=2)


def test_buckets_are_dtype_grouped_bounded_and_ordered():
    entries = [
        ManifestEntry("a.m.w", (10,), "float32", (10,)),  # each in a layer of its own
        ManifestEntry("b.m.w", (10,), "bfloat16", (10,)),
        ManifestEntry("c.m.w", (30,), "float32", (30,)),
        ManifestEntry("d.m.w", (5,), "float32", (5,)),
    ]
    buckets = communicator.plan_buckets(entries, bucket_bytes=100)
    assert [[e.name[0] for e in bucket] for bucket in buckets] == [["a"], ["c"], ["d"], ["b"]]
    for bucket in buckets:
        assert len({e.dtype for e in bucket}) == 1
        assert len(bucket) == 1 or sum(e.nbytes for e in bucket) <= 100


def test_buckets_never_split_the_parts_of_one_layer():
    def entry(name):
        return ManifestEntry(name, (4,), "float32", (4,))

    names = ["model.embed_tokens.weight"] + [
        f"model.layers.0.{m}.weight"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")
    ]  # fmt: skip
    buckets = communicator.plan_buckets([entry(n) for n in names], bucket_bytes=40)
    layers = [{communicator.layer_of(e.name) for e in bucket} for bucket in buckets]
    assert [len(b) for b in buckets] == [1, 4, 3, 1]  # q/k/v/o together (64 B > 40 B), mlp
    assert layers[1] == {"model.layers.0.self_attn"} and layers[2] == {"model.layers.0.mlp"}


def test_senders_broadcasts_land_in_the_receivers_layout():
    full = {"w": torch.arange(35.0).view(7, 5), "v": torch.arange(3.0), "x": torch.ones(2, 2)}
    entries = [
        ManifestEntry("w", (7, 5), "float32", communicator.even_splits(7, 3)),
        ManifestEntry("v", (3,), "float32", communicator.even_splits(3, 3)),
        ManifestEntry("x", (2, 2), "float32", (2, 0, 0)),  # not sharded: sender 0 has it
    ]
    bucket = communicator.BucketLayout(entries, senders=3, direct_min_bytes=64)  # w direct
    assert bucket.direct == [True, False, False]
    layout = torch.full((bucket.numel,), float("nan"))
    staging = []
    for sender in range(3):

        def rows(entry, sender=sender):
            start = sum(entry.splits[:sender])
            return full[entry.name][start : start + entry.splits[sender]].reshape(-1)

        staging.append(
            torch.cat([rows(entries[i]) for i in bucket.packed(sender)] or [torch.zeros(0)])
        )
        assert staging[-1].numel() == bucket.packed_numel(sender)
        for i in bucket.directs(sender):  # what a direct broadcast writes
            start = bucket.rows_start(i, sender)
            layout[start : start + rows(entries[i]).numel()] = rows(entries[i])
    communicator._unpack(bucket, layout, staging)
    for entry, offset in zip(entries, bucket.offsets, strict=True):
        assert torch.equal(
            layout[offset : offset + entry.numel].view(entry.shape), full[entry.name]
        )


def test_arena_reuses_its_memory():
    arena = communicator.Arena("cpu")
    arena.reset(communicator.Arena.span([10, 3], torch.float32))
    a, b = arena.take(10, torch.float32), arena.take(3, torch.float32)
    assert a.data_ptr() % 64 == 0 and b.data_ptr() % 64 == 0 and b.data_ptr() >= a.data_ptr() + 40
    pointer = arena.buffer.data_ptr()
    arena.reset(communicator.Arena.span([5], torch.bfloat16))  # smaller: same memory
    assert arena.take(5, torch.bfloat16).data_ptr() == pointer


def test_a_failed_load_still_receives_every_bucket_then_raises():
    taken = []

    class Buckets:  # stands in for a Receiver: counts the buckets its caller took
        def receive(self, plan, version, replica, tp_rank):
            for index in range(4):
                taken.append(index)
                yield [(f"w{index}", torch.zeros(1))]

    def load(weights):
        if weights[0][0] == "w1":
            raise ValueError("the engine rejected w1")

    with pytest.raises(ValueError, match="rejected w1"):
        communicator.receive_and_load(Buckets(), make_plan(1, {"r0": 1}, "g"), 1, "r0", 0, load)
    assert taken == [0, 1, 2, 3], "the senders block until every receiver took every bucket"


# --------------------------------------------------------------------------------------------
# Across processes


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "replicate,nproc,background",
    [(1, 2, False), (2, 4, False), (1, 2, True)],
    ids=["fsdp2", "hsdp2x2", "fsdp2-background"],
)
def test_replicas_hold_the_policy_weights_after_each_sync(
    tmp_path, tiny_model_dir, replicate, nproc, background
):
    port = free_port()
    syncs = [
        (1, make_plan(port, {"0": 1, "1": 1}, "t/plan1")),  # both replicas
        (2, make_plan(port, {"1": 1}, "t/plan2")),  # replica 1 only (another group)
        (3, make_plan(port, {"0": 1, "1": 1}, "t/plan1")),  # the first group again
    ]
    syncs_file = tmp_path / "syncs.json"
    syncs_file.write_text(json.dumps([{"version": v, "plan": p.model_dump()} for v, p in syncs]))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["SYNC_IN_BACKGROUND"] = "1" if background else "0"
    receivers = [
        subprocess.Popen(
            [
                sys.executable,
                str(PEERS),
                "receiver",
                str(tiny_model_dir),
                str(tmp_path),
                str(syncs_file),
                r,
            ],
            cwd=ROOT,
            env=env,
        )  # fmt: skip
        for r in ("0", "1")
    ]
    try:
        policy = subprocess.run(
            [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", str(PEERS), "policy", str(tiny_model_dir),
                str(tmp_path), str(syncs_file), str(replicate),
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert policy.returncode == 0, policy.stdout[-4000:] + policy.stderr[-6000:]
        assert [p.wait(timeout=60) for p in receivers] == [0, 0]
    finally:
        for p in receivers:
            p.kill()
    manifest = Manifest.from_json((tmp_path / "manifest.json").read_text())
    assert manifest.senders == nproc // replicate
    assert len(manifest.buckets) > 1
    direct = [d for bucket in manifest.buckets for d in bucket.direct]
    assert any(direct) and not all(direct)  # both kinds of broadcast were used
    sent = {v: torch.load(tmp_path / f"policy_v{v}.pt") for v in (1, 2, 3)}
    expected = {("0", 1): 1, ("1", 1): 1, ("1", 2): 2, ("0", 3): 3, ("1", 3): 3}
    for (replica, version), policy_version in expected.items():
        held = torch.load(tmp_path / f"{replica}_v{version}.pt")
        for name, tensor in sent[policy_version].items():
            assert torch.equal(held[name], tensor), (replica, version, name)
    assert not (tmp_path / "0_v2.pt").exists()
    # Every sync changed the weights: a receiver that missed one would not match.
    assert not torch.equal(sent[1]["model.norm.weight"], sent[3]["model.norm.weight"])


@pytest.mark.timeout(60)
def test_a_stalled_sync_names_the_ranks_that_did_not_arrive():
    port = free_port()
    store = communicator.connect_store("127.0.0.1", port, host_it=True, timeout_s=10)
    plan = make_plan(port, {"0": 2, "1": 1}, "t/stall", timeout_s=1.5)
    errors = []

    def other_member():
        client = communicator.connect_store("127.0.0.1", port, host_it=False, timeout_s=10)
        try:
            communicator.check_in(client, plan, 1, "rollout replica 0 tp rank 1", 4)
        except SyncStalled as exc:  # it waits for the same missing members
            errors.append(exc)

    arrived = threading.Thread(target=other_member)
    arrived.start()
    with pytest.raises(SyncStalled) as excinfo:
        communicator.check_in(store, plan, 1, "policy sender 0", 4)
    message = str(excinfo.value)
    assert "rollout replica 0 tp rank 0, rollout replica 1 tp rank 0 did not arrive" in message
    assert "rollout replica 0 tp rank 1" not in message.split("did not arrive")[0]
    assert "rollout.weight_sync_timeout" in message
    arrived.join()
    assert len(errors) == 1 and "policy sender 0" not in str(errors[0]).split("did not")[0]


@pytest.mark.timeout(60)
def test_a_called_off_sync_releases_every_waiting_member_long_before_the_timeout():
    """A member died: the sender learns the sync was called off (from the controller, here a
    flag) and every member waiting in the check-in gives up with SyncCancelled."""
    port = free_port()
    store = communicator.connect_store("127.0.0.1", port, host_it=True, timeout_s=10)
    plan = make_plan(port, {"0": 1, "dead": 1}, "t/off", timeout_s=300)
    errors = []

    def survivor():
        client = communicator.connect_store("127.0.0.1", port, host_it=False, timeout_s=10)
        try:
            communicator.check_in(client, plan, 1, "rollout replica 0 tp rank 0", 2)
        except SyncCancelled as exc:
            errors.append(exc)

    waiting = threading.Thread(target=survivor)
    waiting.start()
    called_off = threading.Event()
    threading.Timer(1.0, called_off.set).start()
    started = time.monotonic()
    with pytest.raises(SyncCancelled, match="called off"):
        communicator.check_in(store, plan, 1, "policy sender 0", 2, called_off.is_set)
    waiting.join(timeout=10)
    assert len(errors) == 1 and time.monotonic() - started < 10


@pytest.mark.timeout(60)
def test_a_transfer_called_off_midway_releases_a_receiver_left_waiting():
    """A member died after the check-in: a survivor's broadcast waits for data that never
    comes. Once the sync is called off (the sender writes it to the store) the survivor gives
    up with SyncCancelled at its next look, not after the 300 s group timeout."""
    port = free_port()
    store = communicator.connect_store("127.0.0.1", port, host_it=True, timeout_s=10)
    plan = make_plan(port, {"0": 1}, "t/midway", timeout_s=300)
    entries = [ManifestEntry("w", (64, 4), "float32", (64,))]
    manifest = Manifest(entries, senders=1, bucket_bytes=1 << 20, direct_min_bytes=1 << 20)
    outcome = []

    def survivor():
        client = communicator.connect_store("127.0.0.1", port, host_it=False, timeout_s=10)
        receiver = communicator.Receiver(manifest, client, "cpu")
        try:
            for _ in receiver.receive(plan, 3, "0", 0):
                outcome.append("received")
        except SyncCancelled as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=survivor)
    waiting.start()
    # The sender checks in and joins the group, then never broadcasts (stuck on a dead peer).
    communicator.check_in(store, plan, 1, communicator.sender_name(0), 3)
    group = communicator.create_group(store, f"{plan.group}/from0", 0, 2, plan.timeout_s)
    time.sleep(1.0)
    assert waiting.is_alive() and not outcome  # still waiting in the broadcast
    started = time.monotonic()
    communicator.call_off(store, plan, 3)
    waiting.join(timeout=10)
    assert not waiting.is_alive() and time.monotonic() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], SyncCancelled)
    assert "during the transfer" in str(outcome[0])
    del group
