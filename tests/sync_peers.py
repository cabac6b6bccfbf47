"""The two sides of the weight-sync tests, as separate processes.

    torchrun ... tests/sync_peers.py policy MODEL OUT SYNCS.json REPLICATE
        FSDP2 policy ranks (REPLICATE x world/REPLICATE mesh): before each sync the weights
        change (as a step would), the senders send them, and rank 0 saves the full weights it
        sent as OUT/policy_v{version}.pt. Rank 0 writes the manifest to OUT/manifest.json.
        With SYNC_IN_BACKGROUND=1 they send from a thread and change the weights again at once.
    python tests/sync_peers.py receiver MODEL OUT SYNCS.json REPLICA
        A transformers rollout engine as replica REPLICA: takes part in each sync that names
        it and saves what the engine then holds as OUT/{REPLICA}_v{version}.pt.
    python tests/sync_peers.py vllm MODEL OUT SYNCS.json REPLICA
        The same with a vLLM engine, tensor parallel over the replica's ranks in the plan.

SYNCS.json is a list of {"version": int, "plan": SyncPlan as a dict}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from gantry.comm.protocol import SyncPlan


def load_syncs(path: str) -> list[tuple[int, SyncPlan]]:
    return [
        (s["version"], SyncPlan.model_validate(s["plan"]))
        for s in json.loads(Path(path).read_text())
    ]


def wait_for(path: Path, timeout_s: float = 120.0) -> Path:
    """`path` once its writer renamed it into place."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path}")
        time.sleep(0.05)
    return path


def wait_for_manifest(out: Path) -> str:
    return wait_for(out / "manifest.json").read_text()


def save_atomic(obj, path: Path) -> None:
    torch.save(obj, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)


def policy(model_dir: str, out: Path, syncs: list[tuple[int, SyncPlan]], replicate: int) -> None:
    import torch.distributed as dist

    from policy.export import tied_weight_names
    from policy.parallel import (
        ParallelDims,
        ShardingOptions,
        build_mesh,
        init_distributed,
        load_sharded_model,
    )
    from policy.weight_sync import PolicySender

    env = init_distributed()
    mesh = build_mesh(ParallelDims(replicate, env.world_size // replicate), env.device)
    model = load_sharded_model(model_dir, mesh, ShardingOptions(param_dtype=torch.float32))
    tied = tied_weight_names(model)
    params = {n: p for n, p in model.named_parameters() if n not in tied}
    sender = PolicySender(
        params, mesh, dtype="float32", is_store_host=env.rank == 0,
        bucket_bytes=64 * 1024, direct_min_bytes=16 * 1024,  # several buckets, both paths
    )  # fmt: skip
    if env.rank == 0:
        tmp = out / "manifest.json.tmp"
        tmp.write_text(sender.manifest.to_json())
        tmp.rename(out / "manifest.json")
    background = os.environ.get("SYNC_IN_BACKGROUND") == "1"
    errors = []
    for version, plan in syncs:
        with torch.no_grad():
            for i, p in enumerate(params.values()):
                p.mul_(1.0 + 0.01 * version).add_(0.001 * (i % 7 - 3) * version)
        full = {n: p.full_tensor() for n, p in params.items()}
        if env.rank == 0:
            save_atomic(full, out / f"policy_v{version}.pt")
        if not background:
            sender.send(plan, version)
            continue
        sender.send_in_background(plan, version, lambda: False, lambda _, e: errors.append(e))
        with torch.no_grad():  # training goes on at once: the receivers must not see this
            for p in params.values():
                p.add_(0.5)
    sender.wait()
    assert errors in ([], [None] * len(errors)), errors
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # torch 2.13's gloo can abort at shutdown (see policy/__main__.py)


def receiver(
    model_dir: str, out: Path, syncs: list[tuple[int, SyncPlan]], replica: str, backend: str
) -> None:
    if backend == "vllm":
        from rollout.vllm_engine import VLLMEngine

        plan = syncs[0][1]
        tp = next(r.ranks for r in plan.receivers if r.replica == replica)
        engine = VLLMEngine(
            model_dir, tp_size=tp, max_model_len=256, dtype="float32", gpu_memory_utilization=0.3
        )
    else:
        from rollout.hf_engine import HFEngine

        engine = HFEngine(model_dir)
    manifest = wait_for_manifest(out)
    for version, plan in syncs:
        if replica in {r.replica for r in plan.receivers}:
            engine.receive_weights(plan, manifest, version, replica)
            save_atomic(engine.read_weights(), out / f"{replica}_v{version}.pt")
    engine.close()


if __name__ == "__main__":
    role, model, out_dir, syncs_file, extra = sys.argv[1:6]
    if role == "policy":
        policy(model, Path(out_dir), load_syncs(syncs_file), int(extra))
    else:
        receiver(model, Path(out_dir), load_syncs(syncs_file), extra, backend=role)
