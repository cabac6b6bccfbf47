"""The rollout engines against transformers: shapes, finish reasons, seeds, log-probs, and
in-place weight updates (untied and tied embeddings).

The reference for every log-prob is a plain transformers forward pass over prompt +
completion: `log_softmax(logits / temperature)` gathered at the sampled tokens. The weight
tests load a second tiny model (another seed) and check both that `read_weights` returns the
loaded tensors exactly and that generation now follows the new model, which proves the
update is in place, `lm_head` included.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gantry.models.tiny import build_tiny_model
from rollout.engine import Completion, SamplingSettings
from rollout.hf_engine import HFEngine

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 6, 7], [10, 11, 12, 13], [5, 6, 7]]  # a repeated prompt: its own seed
LOGPROB_TOL = 1e-4
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------
# Shared helpers


def load_hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], tokens: list[int], temperature: float):
    ids = torch.tensor([prompt + tokens])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def max_logprob_diff(model, prompts, outputs, temperature: float) -> float:
    worst = 0.0
    for prompt, completions in zip(prompts, outputs, strict=True):
        for c in completions:
            expected = reference_logprobs(model, prompt, c.token_ids, temperature)
            worst = max(worst, (expected - torch.tensor(c.logprobs)).abs().max().item())
    return worst


def check_shapes(outputs: list[list[Completion]], n: int, max_tokens: int) -> None:
    assert len(outputs) == len(PROMPTS)
    for completions in outputs:
        assert len(completions) == n
        for c in completions:
            assert 0 < len(c.token_ids) <= max_tokens
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason == ("length" if len(c.token_ids) == max_tokens else "stop")


def check_seeds(engine) -> None:
    sampling = SamplingSettings(n=2, max_tokens=12, seed=123)
    first = engine.generate(PROMPTS, sampling)
    assert engine.generate(PROMPTS, sampling) == first
    # Every sample has its own seed: the repeated prompt and the n samples all differ.
    assert first[0][0].token_ids != first[0][1].token_ids
    assert first[0][0].token_ids != first[2][0].token_ids
    other = engine.generate(PROMPTS, SamplingSettings(n=2, max_tokens=12, seed=124))
    assert other != first


def check_stop_token(engine) -> None:
    """Sampling again with the same seed and a stop token it drew cuts there, with "stop"."""
    sampling = SamplingSettings(n=1, max_tokens=16, seed=7)
    (full,) = engine.generate(PROMPTS[:1], sampling)[0]
    stop = full.token_ids[3]
    sampling.stop_token_ids = [stop]
    (cut,) = engine.generate(PROMPTS[:1], sampling)[0]
    end = full.token_ids.index(stop) + 1
    assert cut.token_ids == full.token_ids[:end]
    assert cut.finish_reason == "stop"
    assert cut.logprobs == pytest.approx(full.logprobs[:end], abs=1e-6)


def check_truncation(engine) -> None:
    """top_k=1 or a tiny top_p keep only the argmax: greedy tokens, each with log-prob 0."""
    greedy = engine.generate(PROMPTS, SamplingSettings(temperature=0.0, max_tokens=8))
    for knobs in ({"top_k": 1}, {"top_p": 1e-6}):
        outputs = engine.generate(PROMPTS, SamplingSettings(max_tokens=8, seed=2, **knobs))
        for ours, best in zip(outputs, greedy, strict=True):
            assert ours[0].token_ids == best[0].token_ids, knobs
            assert ours[0].logprobs == pytest.approx([0.0] * len(ours[0].logprobs), abs=1e-6)


def check_weight_update(engine, new_dir, old_dir, tied: bool) -> None:
    """Load another model's weights; the engine now reads and samples as that model."""
    new = load_hf(new_dir)
    # named_parameters: a tied model sends embed_tokens only, as the policy does.
    sent = {name: p.detach().clone() for name, p in new.named_parameters()}
    assert ("lm_head.weight" in sent) != tied
    engine.load_weights(sent.items())
    read = engine.read_weights()
    for name, tensor in new.state_dict().items():
        assert torch.equal(read[name], tensor), name
    sampling = SamplingSettings(n=2, max_tokens=16, temperature=0.7, seed=3)
    assert max_logprob_diff(new, PROMPTS, engine.generate(PROMPTS, sampling), 0.7) < LOGPROB_TOL
    # And back (a second update; also leaves a shared engine as it was).
    old = load_hf(old_dir)
    engine.load_weights((n, p.detach()) for n, p in old.named_parameters())
    assert max_logprob_diff(old, PROMPTS, engine.generate(PROMPTS, sampling), 0.7) < LOGPROB_TOL


@pytest.fixture(scope="module")
def other_model_dirs(tmp_path_factory) -> dict[bool, Path]:
    """A second tiny model of each kind (other seed), keyed by tie_word_embeddings."""
    return {
        tied: build_tiny_model(
            tmp_path_factory.mktemp(f"other-tied{int(tied)}"), seed=1, tie_word_embeddings=tied
        )
        for tied in (False, True)
    }


def model_dir(request, tied: bool) -> Path:
    return request.getfixturevalue("tiny_tied_model_dir" if tied else "tiny_model_dir")


# --------------------------------------------------------------------------------------------
# transformers engine (fast)


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    engine = HFEngine(str(tiny_model_dir))
    yield engine
    engine.close()


def test_hf_shapes_and_finish_reasons(hf_engine):
    outputs = hf_engine.generate(PROMPTS, SamplingSettings(n=3, max_tokens=10, seed=0))
    check_shapes(outputs, n=3, max_tokens=10)


def test_hf_seeds_are_deterministic_and_per_sample(hf_engine):
    check_seeds(hf_engine)


def test_hf_stop_token_ends_completion(hf_engine):
    check_stop_token(hf_engine)


def test_hf_eos_ends_completion(tiny_model_dir, tmp_path):
    """With EOS set (in generation_config.json) to the token it samples first, it stops there."""
    sampling = SamplingSettings(max_tokens=4, seed=5)
    first = HFEngine(str(tiny_model_dir)).generate(PROMPTS[:1], sampling)[0][0]
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    config_path = tmp_path / "model" / "generation_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "eos_token_id": first.token_ids[0]}))
    again = HFEngine(str(tmp_path / "model")).generate(PROMPTS[:1], sampling)[0][0]
    assert again.token_ids == first.token_ids[:1] and again.finish_reason == "stop"


def test_hf_top_k_and_top_p(hf_engine):
    check_truncation(hf_engine)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_logprobs_match_transformers(hf_engine, tiny_model_dir, temperature):
    sampling = SamplingSettings(n=2, max_tokens=16, temperature=temperature, seed=1)
    outputs = hf_engine.generate(PROMPTS, sampling)
    assert max_logprob_diff(load_hf(tiny_model_dir), PROMPTS, outputs, temperature) < LOGPROB_TOL


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_load_weights_in_place(request, other_model_dirs, tied):
    path = model_dir(request, tied)
    engine = HFEngine(str(path))
    check_weight_update(engine, other_model_dirs[tied], path, tied)


def test_hf_load_weights_rejects_unknown_names(hf_engine):
    with pytest.raises(KeyError):
        hf_engine.load_weights([("no.such.weight", torch.zeros(1))])


# --------------------------------------------------------------------------------------------
# vLLM engine: helpers that need no engine (fast)


def test_weight_chunks_survive_serialisation():
    from rollout.vllm_engine import decode_chunk, encode_chunk

    flat = torch.arange(10, dtype=torch.float32)  # views of one buffer, as the receiver yields
    chunk = [("a", flat[:4].view(2, 2)), ("b", flat[4:])]
    kind, data = encode_chunk(chunk)
    assert kind == "torch" and isinstance(data, bytes)
    decoded = list(decode_chunk((kind, data), torch.device("cpu")))
    assert [n for n, _ in decoded] == ["a", "b"]
    assert all(torch.equal(t, ref) for (_, t), (_, ref) in zip(decoded, chunk, strict=True))


def test_gather_ranks_joins_tensor_parallel_shards():
    from rollout.vllm_engine import gather_ranks

    full_q, full_o = torch.randn(8, 4), torch.randn(4, 8)
    k_heads = [torch.randn(2, 4)]  # one KV head replicated on both ranks
    vocab = torch.randn(12, 4)  # 10 real rows + 2 padding, split 6/6
    ranks = [
        {
            "q": (full_q[4 * r : 4 * r + 4], (0, 1, None)),
            "k": (k_heads[0], (0, 2, None)),
            "o": (full_o[:, 4 * r : 4 * r + 4], (1, 1, None)),
            "norm": (torch.ones(4), (None, 1, None)),
            "embed": (vocab[6 * r : 6 * r + 6], (0, 1, 10)),
        }
        for r in range(2)
    ]
    out = gather_ranks(ranks)
    assert torch.equal(out["q"], full_q) and torch.equal(out["o"], full_o)
    assert torch.equal(out["k"], k_heads[0]) and torch.equal(out["norm"], torch.ones(4))
    assert torch.equal(out["embed"], vocab[:10])


def test_packed_cpu_weights_read_back_exactly(monkeypatch):
    """The identity probe recovers a weight hidden in a kernel, block by block."""
    import rollout.vllm_compat as vllm_compat

    monkeypatch.setattr(vllm_compat, "PROBE_ROWS", 3)  # 3 + 3 + 1 rows of the identity
    weight = torch.randn(5, 7)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # repacked away
    layer.cpu_linear = lambda x, w, bias: torch.nn.functional.linear(x, weight, bias)
    read = vllm_compat.probe_linear(layer, 7, torch.float32, torch.device("cpu"))
    assert torch.equal(read, weight)


# --------------------------------------------------------------------------------------------
# vLLM engine (slow: one engine per kind of model, shared by the tests below)


@dataclass
class VLLMCase:
    engine: object
    model_dir: Path
    other_dir: Path
    tied: bool


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def vllm_case(request, other_model_dirs):
    pytest.importorskip("vllm")
    from rollout.vllm_engine import VLLMEngine

    tied = request.param
    path = model_dir(request, tied)
    engine = VLLMEngine(
        str(path), max_model_len=256, dtype="float32", kv_cache_memory_bytes=64 << 20
    )
    yield VLLMCase(engine, path, other_model_dirs[tied], tied)
    engine.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_shapes_and_finish_reasons(vllm_case):
    outputs = vllm_case.engine.generate(PROMPTS, SamplingSettings(n=3, max_tokens=10, seed=0))
    check_shapes(outputs, n=3, max_tokens=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_seeds_are_deterministic_and_per_sample(vllm_case):
    check_seeds(vllm_case.engine)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_seeded_batch_larger_than_one_step(vllm_case):
    """More prefill tokens than one scheduler step takes, every request seeded (a CPU-build
    crash when prefills were chunked); the result is still deterministic."""
    prompts = [[5 + i % 50] * 40 for i in range(64)]
    sampling = SamplingSettings(n=8, max_tokens=4, seed=11)  # 64 * 8 * 40 > 8192 tokens
    first = vllm_case.engine.generate(prompts, sampling)
    assert len(first) == 64 and all(len(group) == 8 for group in first)
    again = vllm_case.engine.generate(prompts, sampling)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_stop_token_ends_completion(vllm_case):
    check_stop_token(vllm_case.engine)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_top_k_and_top_p(vllm_case):
    check_truncation(vllm_case.engine)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_transformers(vllm_case, temperature):
    sampling = SamplingSettings(n=2, max_tokens=24, temperature=temperature, seed=1)
    outputs = vllm_case.engine.generate(PROMPTS, sampling)
    model = load_hf(vllm_case.model_dir)
    assert max_logprob_diff(model, PROMPTS, outputs, temperature) < LOGPROB_TOL


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_read_weights_match_checkpoint(vllm_case):
    read = vllm_case.engine.read_weights()
    expected = load_hf(vllm_case.model_dir).state_dict()
    assert set(read) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(read[name], tensor), name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_load_weights_in_place(vllm_case):
    check_weight_update(vllm_case.engine, vllm_case.other_dir, vllm_case.model_dir, vllm_case.tied)


def _runner_class_defining(engine, method: str) -> type:
    """The class of the engine's model runner (in this process) that defines `method`."""
    (runner,) = engine._llm.collective_rpc(lambda worker: type(worker.model_runner))
    return next(cls for cls in runner.__mro__ if method in vars(cls))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_workers_are_checked_for_every_internal_the_engine_uses(vllm_case, monkeypatch):
    from rollout.vllm_compat import VLLMInternalsMissing, check_engine

    llm = vllm_case.engine._llm
    assert llm.collective_rpc("gantry_check_worker") == [[]]
    monkeypatch.delattr(
        _runner_class_defining(vllm_case.engine, "reset_mm_cache"), "reset_mm_cache"
    )
    with pytest.raises(VLLMInternalsMissing, match=r"lacks .* in its workers") as raised:
        check_engine(llm)
    assert raised.value.missing == ["model_runner.reset_mm_cache"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_weight_update_stops_when_a_worker_cache_cannot_be_reset(vllm_case, monkeypatch):
    """No cache reset is skipped: the update fails, naming it (the start-up check would have
    stopped this vLLM before any update)."""
    cls = _runner_class_defining(vllm_case.engine, "reset_encoder_cache")
    monkeypatch.delattr(cls, "reset_encoder_cache")
    same = load_hf(vllm_case.model_dir)  # the weights it holds: later tests see no change
    with pytest.raises(AttributeError, match="reset_encoder_cache"):
        vllm_case.engine.load_weights(same.named_parameters())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_sync_called_off_in_the_workers_is_raised_by_the_engine(vllm_case, monkeypatch):
    """The workers answer a called-off sync (vLLM's engine-core process would turn a raised
    SyncCancelled into a bare Exception); the engine raises it, for the rollout worker."""
    from gantry.comm.protocol import Receiver, SyncPlan
    from gantry.comm.sync_groups import SyncCancelled
    from gantry.comm.weights import WeightReceiver

    def called_off(self, plan, manifest, version, replica, tp_rank, load):
        raise SyncCancelled(f"weight sync v{version} was called off by the controller")

    monkeypatch.setattr(WeightReceiver, "receive", called_off)  # as if a member had died
    plan = SyncPlan(
        group="g", host="127.0.0.1", port=1, receivers=[Receiver(replica="0", ranks=1)],
        timeout_s=5.0,
    )  # fmt: skip
    from rollout import vllm_compat

    resets = []
    reset = vllm_compat.reset_engine_caches
    monkeypatch.setattr(vllm_compat, "reset_engine_caches", lambda llm: resets.append(reset(llm)))
    with pytest.raises(SyncCancelled, match="v7 was called off"):
        vllm_case.engine.receive_weights(plan, "{}", 7, "0")
    assert len(resets) == 1  # the workers answered; caches reset (they may hold new weights)


# The same checks with vLLM's engine core and worker in other processes (the layout of every
# CUDA run): weights cross as serialised chunks instead of in-process tensors.
MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    sys.path.insert(0, {root!r})
    from tests.test_engines import check_weight_update, check_stop_token
    from rollout.vllm_engine import VLLMEngine

    if __name__ == "__main__":
        base, other = sys.argv[1:3]
        engine = VLLMEngine(base, max_model_len=256, dtype="float32", kv_cache_memory_bytes=64 << 20)
        assert not engine.in_process
        check_stop_token(engine)
        check_weight_update(engine, other, base, tied=True)
        engine.close()
        print("multiprocess engine ok")
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_engine_core_in_another_process(tmp_path, tiny_tied_model_dir, other_model_dirs):
    pytest.importorskip("vllm")
    script = tmp_path / "multiprocess_engine.py"
    script.write_text(MULTIPROCESS_SCRIPT.format(root=str(ROOT)))
    args = [sys.executable, str(script), str(tiny_tied_model_dir), str(other_model_dirs[True])]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "multiprocess engine ok" in result.stdout


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(600)
@cuda_only
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vllm_on_gpu(request, other_model_dirs, tp, tied):
    """vLLM's own worker processes: weights arrive as CUDA IPC handles, read-back joins the
    ranks' shards (tp=2 splits the 2 attention heads, the MLP and the vocabulary)."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    from rollout.vllm_engine import VLLMEngine

    path = model_dir(request, tied)
    engine = VLLMEngine(
        str(path), tp_size=tp, max_model_len=256, dtype="float32", gpu_memory_utilization=0.3
    )
    try:
        assert not engine.in_process
        sampling = SamplingSettings(n=2, max_tokens=16, temperature=0.7, seed=1)
        outputs = engine.generate(PROMPTS, sampling)
        assert max_logprob_diff(load_hf(path), PROMPTS, outputs, 0.7) < 1e-3  # GPU vs CPU
        new = load_hf(other_model_dirs[tied])
        engine.load_weights((n, p.detach().cuda()) for n, p in new.named_parameters())
        read = engine.read_weights()
        for name, tensor in new.state_dict().items():
            assert torch.equal(read[name], tensor), name
        outputs = engine.generate(PROMPTS, sampling)
        assert max_logprob_diff(new, PROMPTS, outputs, 0.7) < 1e-3
    finally:
        engine.close()


def test_cpu_binding_gives_each_tp_worker_its_cores(monkeypatch):
    from rollout.vllm_engine import cpu_binding

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3, 5})
    assert cpu_binding(2) == "0,1|2,3"
    assert cpu_binding(1) == "0,1,2,3,5"
    assert cpu_binding(8) == "nobind"  # fewer cores than workers: leave placement to the OS
