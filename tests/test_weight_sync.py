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
from pathlib import Path

import pytest
import torch

from gantry import communicator
from gantry.communicator import Manifest, ManifestEntry, SyncStalled
from gantry.protocol import Receiver, SyncPlan
from gantry.redis_server import free_port

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
        ManifestEntry("a", (10,), "float32", (10,)),
        ManifestEntry("b", (10,), "bfloat16", (10,)),
        ManifestEntry("c", (30,), "float32", (30,)),
        ManifestEntry("d", (5,), "float32", (5,)),
    ]
    buckets = communicator.plan_buckets(entries, bucket_bytes=100)
    assert [[e.name for e in bucket] for bucket in buckets] == [["a"], ["c"], ["d"], ["b"]]
    for bucket in buckets:
        assert len({e.dtype for e in bucket}) == 1
        assert len(bucket) == 1 or sum(e.nbytes for e in bucket) <= 100


def test_sender_parts_reassemble_into_full_tensors():
    full = {"w": torch.arange(35.0).view(7, 5), "v": torch.arange(3.0), "x": torch.ones(2, 2)}
    entries = [
        ManifestEntry("w", (7, 5), "float32", communicator.even_splits(7, 3)),
        ManifestEntry("v", (3,), "float32", communicator.even_splits(3, 3)),
        ManifestEntry("x", (2, 2), "float32", (2, 0, 0)),  # not sharded: sender 0 has it
    ]
    parts = []
    for sender in range(3):
        rows, start = [], 0
        for e in entries:
            start = sum(e.splits[:sender])
            rows.append(full[e.name][start : start + e.splits[sender]].reshape(-1))
        parts.append(torch.cat(rows))
        assert parts[-1].numel() == communicator.part_numel(entries, sender)
    assembled = dict(communicator._assemble(entries, parts))
    for name, tensor in full.items():
        assert torch.equal(assembled[name], tensor), name


# --------------------------------------------------------------------------------------------
# Across processes


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("replicate,nproc", [(1, 2), (2, 4)], ids=["fsdp2", "hsdp2x2"])
def test_replicas_hold_the_policy_weights_after_each_sync(
    tmp_path, tiny_model_dir, replicate, nproc
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
