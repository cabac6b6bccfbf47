"""Weight sync over a real gloo process group between two separately started processes.

The sender plays the policy (weights changed by "training"), the receiver a rollout engine;
after the sync the engine's weights are bitwise equal to the policy's.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from gantry.communicator import ManifestEntry, manifest_of, plan_buckets
from gantry.redis_server import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

PEER = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    from gantry import communicator
    from gantry.protocol import Keys
    from gantry.transport import ControlPlane

    role, model_dir, redis_url, out = sys.argv[1:5]
    plane, keys = ControlPlane(redis_url), Keys("sync-test")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if role == "policy":
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        weights = {n: p.detach() for n, p in model.named_parameters()}
        manifest = communicator.manifest_of(weights.items())
        communicator.publish_manifest(plane, keys, manifest, 64 * 1024)  # several buckets
        group = communicator.join_group(plane, keys, rank=0)
        communicator.send_weights(group, weights, communicator.plan_buckets(manifest, 64 * 1024))
        torch.save(weights, out)
    else:
        from rollout.hf_engine import HFEngine
        engine = HFEngine(model_dir)
        group = communicator.join_group(plane, keys, rank=1)  # after the policy published
        manifest, bucket_bytes = communicator.read_manifest(plane, keys)
        buckets = communicator.plan_buckets(manifest, bucket_bytes)
        engine.load_weights(communicator.receive_weights(group, buckets))
        torch.save(engine.read_weights(), out)
    """
)


def test_weights_after_sync_are_bitwise_equal(tmp_path, tiny_model_dir, redis_url):
    from gantry.protocol import Keys
    from gantry.transport import ControlPlane

    keys = Keys("sync-test")
    ControlPlane(redis_url).redis.hset(
        keys.rendezvous,
        mapping={"host": "127.0.0.1", "port": free_port(), "world_size": 2, "prefix": "t"},
    )
    procs = {}
    for role in ("policy", "rollout"):
        out = tmp_path / f"{role}.pt"
        cmd = [sys.executable, "-c", PEER, role, str(tiny_model_dir), redis_url, str(out)]
        procs[role] = (subprocess.Popen(cmd), out)
    for role, (proc, _) in procs.items():
        try:
            assert proc.wait(timeout=150) == 0, f"{role} failed"
        finally:
            proc.kill()
    sent = torch.load(procs["policy"][1])
    received = torch.load(procs["rollout"][1])
    assert set(sent) <= set(received)
    for name, tensor in sent.items():
        assert torch.equal(received[name], tensor), name


def test_buckets_are_dtype_grouped_bounded_and_ordered():
    tensors = {
        "a": torch.zeros(10, dtype=torch.float32),
        "b": torch.zeros(10, dtype=torch.bfloat16),
        "c": torch.zeros(30, dtype=torch.float32),
        "d": torch.zeros(5, dtype=torch.float32),
    }
    manifest = manifest_of(tensors.items())
    assert manifest[1] == ManifestEntry("b", (10,), "bfloat16")
    buckets = plan_buckets(manifest, bucket_bytes=100)
    names = [[e.name for e in bucket] for bucket in buckets]
    assert names == [["a"], ["c"], ["d"], ["b"]]
    for bucket in buckets:
        assert len({e.dtype for e in bucket}) == 1
        assert len(bucket) == 1 or sum(e.numel * e.torch_dtype.itemsize for e in bucket) <= 100
