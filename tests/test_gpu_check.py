"""The GPU check (bench/gpu_check.sh) and the one-GPU GRPO run it needs.

On a machine without CUDA the script skips cleanly and its dry run validates the configs it
would launch. On one GPU a GRPO run's single-rank policy and transformers rollout replica share
the device (gantry.launch.nodes.shares_one_gpu), and the weight sync between them runs over
gloo, since NCCL refuses two ranks of one communicator on one GPU: the selection is tested here
on CPU, the sync itself by the `gpu` test at the end (which the GPU check runs).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from gantry.comm.sync_groups import backend_for_members
from gantry.config import load_config
from gantry.launch.nodes import node_plan
from gantry.launch.placement import LaunchError, resolve_parallelism

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs" / "quickstart-grpo.toml"


def _script(*args: str) -> subprocess.CompletedProcess:
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_the_script_skips_cleanly_without_cuda():
    done = _script()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA device here: skipped" in done.stdout
    assert 'rollout.backend="transformers"' in done.stdout  # the plan: what it would run
    assert "config ok" not in done.stdout  # the plan alone validates nothing


def test_the_dry_run_validates_each_config_and_places_it_on_one_gpu():
    done = _script("--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sft: config ok (sft, policy0 on GPU [0])" in done.stdout
    assert "grpo: config ok (grpo, policy0 on GPU [0], rollout0 on GPU [0])" in done.stdout


def test_members_sharing_a_gpu_or_on_cpu_sync_over_gloo():
    assert backend_for_members(["GPU-a", "GPU-b", "GPU-c"]) == "nccl"
    assert backend_for_members(["GPU-a", "GPU-a"]) == "gloo"  # NCCL: "Duplicate GPU detected"
    assert backend_for_members(["GPU-a", "GPU-b", "GPU-a"]) == "gloo"
    assert backend_for_members(["", ""]) == "gloo"


def _grpo(*overrides: str):
    return load_config(GRPO, ['rollout.backend="transformers"', *overrides])


def test_one_gpu_is_shared_by_a_single_rank_policy_and_a_transformers_rollout():
    config = resolve_parallelism(_grpo(), gpus=1)
    assert config.policy.parallelism.dp_shard_size == 1
    placed = {p.name: p.gpus for p in node_plan(config, 1, gpus_per_node=1)[0]}
    assert placed == {"controller": (), "policy0": (0,), "rollout0": (0,)}
    two = {p.name: p.gpus for p in node_plan(resolve_parallelism(_grpo(), gpus=2), 1, 0, 2)[0]}
    assert two == {"controller": (), "policy0": (0,), "rollout0": (1,)}  # own GPUs: NCCL


@pytest.mark.parametrize(
    "override",
    ['rollout.backend="vllm"', "rollout.parallelism.n_init_replicas=2"],
    ids=["vllm-takes-the-memory", "two-rollout-replicas"],
)
def test_one_gpu_is_not_shared_otherwise(override):
    with pytest.raises(LaunchError, match="but this node has 1"):
        resolve_parallelism(_grpo(override), gpus=1)


def test_the_figures_are_medians_of_the_steady_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    run = tmp_path / "outputs" / "20261203-000000"
    run.mkdir(parents=True)
    steps = [{"step": s, "tokens_per_s": 10.0 * s, "loss": 1.0} for s in range(1, 6)]
    lines = [json.dumps(r) for r in steps] + ['{"event": "done"}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    figures = gpu_check.summarise(gpu_check.read_metrics(tmp_path / "outputs"), ["tokens_per_s"])
    assert figures == {"tokens_per_s_median": 40.0, "steps": 5}  # steps 3-5: 30, 40, 50


@pytest.mark.gpu
@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_policy_and_a_transformers_rollout_sync_on_one_gpu(tmp_path, tiny_model_dir):
    """Both on GPU 0, as a one-GPU GRPO run places them: the group picks gloo (NCCL would
    refuse the duplicate GPU), and the engine holds the policy's weights after each sync."""
    from gantry.comm.protocol import Receiver, SyncPlan
    from gantry.launch.redis_server import free_port
    from rollout.hf_engine import HFEngine
    from tests.sync_peers import wait_for, wait_for_manifest
    from tests.test_rollout_sync import start_policy

    plan = SyncPlan(
        group="t/shared", host="127.0.0.1", port=free_port(),
        receivers=[Receiver(replica="0", ranks=1)], timeout_s=120.0,
    )  # fmt: skip
    engine = HFEngine(str(tiny_model_dir), device="cuda:0")
    policy = start_policy(
        tmp_path, tiny_model_dir, [(1, plan), (2, plan)], nproc=1, CUDA_VISIBLE_DEVICES="0"
    )
    try:
        manifest = wait_for_manifest(tmp_path)
        for version in (1, 2):
            engine.receive_weights(plan, manifest, version, "0")
            sent = torch.load(wait_for(tmp_path / f"policy_v{version}.pt"), map_location="cpu")
            held = engine.read_weights()
            for name, tensor in sent.items():
                assert torch.equal(held[name].cpu(), tensor), (version, name)
        assert policy.wait(timeout=120) == 0, (tmp_path / "policy.log").read_text()[-4000:]
    finally:
        policy.kill()
        engine.close()
