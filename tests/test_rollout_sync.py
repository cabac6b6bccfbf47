"""Weight sync into vLLM, tensor parallel or not: a 2-rank FSDP2 policy (torchrun) sends, the
engine's TP workers receive and load in place.

After each sync the weights read back from every TP worker equal the policy's, and the
log-probs vLLM reports for its samples equal those the policy computes for the same tokens
(a transformers forward pass over the policy's weights), so the importance ratio right after
a sync is 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gantry.comm.protocol import Receiver, SyncPlan
from gantry.launch.redis_server import free_port
from rollout.engine import SamplingSettings

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "tests" / "sync_peers.py"
PROMPTS = [[5, 6, 7], [10, 11, 12, 13]]
LOGPROB_TOL = 1e-4
on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU build of vLLM")


@torch.no_grad()
def policy_logprobs(model, prompt: list[int], tokens: list[int], temperature: float):
    ids = torch.tensor([prompt + tokens])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def write_syncs(tmp_path: Path, syncs: list[tuple[int, SyncPlan]]) -> Path:
    syncs_file = tmp_path / "syncs.json"
    syncs_file.write_text(json.dumps([{"version": v, "plan": p.model_dump()} for v, p in syncs]))
    return syncs_file


def start_peer(tmp_path: Path, name: str, cmd: list[str], **env) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def start_policy(
    tmp_path: Path, model_dir: Path, syncs: list[tuple[int, SyncPlan]], nproc: int = 2, **env
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(PEERS), "policy", str(model_dir), str(tmp_path), str(write_syncs(tmp_path, syncs)), "1",
    ]  # fmt: skip
    return start_peer(tmp_path, "policy", cmd, **env)


def check_sync(engine, tmp_path: Path, model_dir: Path, tp: int) -> None:
    from tests.sync_peers import wait_for, wait_for_manifest

    port = free_port()
    plan = SyncPlan(
        group="t/plan1", host="127.0.0.1", port=port,
        receivers=[Receiver(replica="0", ranks=tp)], timeout_s=120.0,
    )  # fmt: skip
    policy = start_policy(tmp_path, model_dir, [(1, plan), (2, plan)])
    try:
        manifest = wait_for_manifest(tmp_path)
        for version in (1, 2):
            engine.receive_weights(plan, manifest, version, "0")
            sent = torch.load(wait_for(tmp_path / f"policy_v{version}.pt"))
            held = engine.read_weights()
            for name, tensor in sent.items():
                assert torch.equal(held[name], tensor), (version, name)
        assert policy.wait(timeout=120) == 0, (tmp_path / "policy.log").read_text()[-4000:]
    finally:
        policy.kill()
    # The policy recomputes the log-probs of what vLLM sampled with the synced weights.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.load_state_dict(sent, strict=False)
    sampling = SamplingSettings(n=2, temperature=0.7, max_tokens=16, seed=3)
    worst = 0.0
    for prompt, completions in zip(PROMPTS, engine.generate(PROMPTS, sampling), strict=True):
        for c in completions:
            expected = policy_logprobs(model, prompt, c.token_ids, 0.7)
            worst = max(worst, (expected - torch.tensor(c.logprobs)).abs().max().item())
    assert worst < LOGPROB_TOL


@on_cpu
@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(400)
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_vllm_holds_the_policy_weights_after_a_sync(tmp_path, tiny_model_dir, tp):
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        str(tiny_model_dir), tp_size=tp, max_model_len=256, dtype="float32",
        kv_cache_memory_bytes=64 << 20,
    )  # fmt: skip
    try:
        check_sync(engine, tmp_path, tiny_model_dir, tp)
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_nccl_sync_into_vllm_on_gpu(tmp_path, tiny_model_dir, tp):
    """NCCL from a policy rank on GPU 0 to a vLLM replica on the next `tp` GPUs (NCCL needs
    one GPU per member)."""
    if torch.cuda.device_count() < 1 + tp:
        pytest.skip(f"needs {1 + tp} GPUs")
    plan = SyncPlan(
        group="t/gpu", host="127.0.0.1", port=free_port(),
        receivers=[Receiver(replica="0", ranks=tp)], timeout_s=300.0,
    )  # fmt: skip
    syncs = [(1, plan), (2, plan)]
    policy = start_policy(tmp_path, tiny_model_dir, syncs, nproc=1, CUDA_VISIBLE_DEVICES="0")
    devices = ",".join(str(i) for i in range(1, 1 + tp))
    cmd = [sys.executable, str(PEERS), "vllm", str(tiny_model_dir), str(tmp_path),
           str(tmp_path / "syncs.json"), "0"]  # fmt: skip
    rollout = start_peer(tmp_path, "rollout", cmd, CUDA_VISIBLE_DEVICES=devices)
    try:
        for name, process in (("policy", policy), ("rollout", rollout)):
            log = (tmp_path / f"{name}.log").read_text
            assert process.wait(timeout=540) == 0, log()[-4000:]
    finally:
        policy.kill()
        rollout.kill()
    for version in (1, 2):
        sent = torch.load(tmp_path / f"policy_v{version}.pt")
        held = torch.load(tmp_path / f"0_v{version}.pt")
        for name, tensor in sent.items():
            assert torch.equal(held[name].cpu(), tensor.cpu()), (version, name)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_a_replica_waiting_for_prompts_checks_in_to_a_sync_at_once(redis_url, tmp_path, tiny_llm):
    """The rollout worker's own loop (transformers engine) blocks on its prompts and its
    commands together: a sync order reaches it while no prompt ever comes, it checks in, takes
    the policy's weights (a real FSDP2 sender) and says so with the order's latency."""
    import threading

    from gantry.comm.protocol import Stop, SyncWeights, WeightsSynced
    from gantry.config import load_config
    from gantry.run.runtime import RunInfo
    from rollout.worker import RolloutWorker
    from tests.sync_peers import wait_for, wait_for_manifest

    config = load_config(
        ROOT / "configs/quickstart-grpo.toml",
        ["rollout.backend=transformers", "rollout.n_generation=2", "rollout.batch_size=2"],
    )
    info = RunInfo(
        run_id="run", run_dir=str(tmp_path), redis_url=redis_url,
        dataset_script=str(ROOT / "datasets/arithmetic.py"), dataset_size=64,
        model_path=str(tiny_llm),
    )  # fmt: skip
    plan = SyncPlan(
        group="t/plan1", host="127.0.0.1", port=free_port(),
        receivers=[Receiver(replica="0", ranks=1)], timeout_s=120.0,
    )  # fmt: skip
    worker = RolloutWorker(config, info, "0")
    plane, keys = worker.plane, info.keys
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            worker._run()
        except BaseException as exc:  # handed to the test's thread, which fails on it
            errors.append(exc)

    policy = start_policy(tmp_path, tiny_llm, [(1, plan)])
    thread = threading.Thread(target=loop, daemon=True)
    try:
        plane.redis.set(keys.manifest, wait_for_manifest(tmp_path))
        thread.start()
        registered = plane.read_next(keys.events, block_ms=60_000)
        assert [m.role for m in registered] == ["rollout"], errors
        plane.send(keys.commands("rollout", "0"), SyncWeights(version=1, plan=plan))
        synced = plane.read_next(keys.events, block_ms=120_000)
        assert synced and isinstance(synced[0], WeightsSynced), (errors, policy.poll())
        assert synced[0].version == 1 and synced[0].order_latency_ms >= 0
        assert worker.version == 1
        sent = torch.load(wait_for(tmp_path / "policy_v1.pt"))
        held = worker.engine.read_weights()
        for name, tensor in sent.items():
            assert torch.equal(held[name].float(), tensor.float()), name
        assert policy.wait(timeout=120) == 0, (tmp_path / "policy.log").read_text()[-4000:]
        plane.send(keys.commands("rollout", "0"), Stop(reason="test"))
        thread.join(timeout=60)
        assert not thread.is_alive() and errors == []
        assert plane.redis.xlen(keys.prompts("0")) == 0  # no prompt ever came
    finally:
        policy.kill()
