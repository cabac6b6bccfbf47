"""The FSDP2 policy step: N ranks (sharded, and sharded + replicated) take the same step as one
process on the whole batch, with gradient accumulation over micro-batches."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.distributed_helpers import run_ranks

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from gantry.config import load_config
    from gantry.comm.protocol import RolloutGroup, Sample
    from policy.parallel import build_mesh, init_distributed
    from policy.trainer import GRPOTrainer
    from policy.worker import parallel_dims

    model_dir, out, *overrides = sys.argv[1:]
    config = load_config(None, ["train.param_dtype=\\"float32\\"", "train.optm_lr=1e-2",
                                "rollout.n_generation=4", "train.train_batch_per_replica=24",
                                *overrides])
    env = init_distributed()
    trainer = GRPOTrainer(config, model_dir, env, build_mesh(parallel_dims(config), env.device), 10)
    gen = torch.Generator().manual_seed(0)

    def group(i):
        prompt = torch.randint(3, 200, (5 + i % 3,), generator=gen).tolist()
        samples = []
        for j in range(4):
            n = 2 + (i + j) % 4
            samples.append(Sample(
                token_ids=torch.randint(3, 200, (n,), generator=gen).tolist(),
                logprobs=(-torch.rand(n, generator=gen) * 4).tolist(),
                reward=float(torch.rand(1, generator=gen)), finish_reason="stop"))
        return RolloutGroup(prompt_id=f"0:{i}", replica="0", policy_version=0,
                            prompt_token_ids=prompt, samples=samples)

    steps = []
    for step in range(2):
        groups = [group(step * 6 + i) for i in range(6)][::-1]  # order must not matter
        steps.append(trainer.step(groups))
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:
        torch.save(state, out + ".pt")
        json.dump(steps, open(out + ".json", "w"))
    dist.destroy_process_group()
    # torch 2.13's gloo can abort at interpreter shutdown (see policy/__main__.py)
    sys.stdout.flush()
    os._exit(0)
    """
)


def _run(tmp_path, model_dir, name, nproc, *overrides):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / name
    run_ranks(script, nproc, [model_dir, out, *overrides], timeout=240)
    return json.loads(out.with_suffix(".json").read_text()), torch.load(out.with_suffix(".pt"))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(600)
def test_sharded_and_replicated_steps_match_one_process(tmp_path, tiny_model_dir):
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    single, single_w = _run(
        tmp_path, tiny_model_dir, "single", 1, "train.train_policy.mini_batch=24"
    )
    layouts = {
        "fsdp2": (2, ["policy.parallelism.dp_shard_size=2", "train.train_policy.mini_batch=5"]),
        "hsdp": (4, ["policy.parallelism.dp_shard_size=2", "policy.parallelism.dp_replicate_size=2",
                     "train.train_policy.mini_batch=2"]),
        # the same arithmetic, held differently: recomputed activations, fused AdamW (offload
        # is a no-op without an accelerator; tests/test_policy_gpu.py runs it on a GPU)
        "ckpt+offload+fused": (2, ["policy.parallelism.dp_shard_size=2",
                                   "train.train_policy.mini_batch=6",
                                   "policy.model_gradient_checkpointing=true",
                                   "train.fsdp_offload=true", "train.optm_impl=\"fused\""]),
    }  # fmt: skip
    for name, (nproc, overrides) in layouts.items():
        metrics, weights = _run(tmp_path, tiny_model_dir, name, nproc, *overrides)
        for a, b in zip(single, metrics, strict=True):
            assert a["tokens"] == b["tokens"], name
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), name
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), name
            assert b["ratio_mean"] == pytest.approx(a["ratio_mean"], rel=1e-5), name
            # The other statistics reduce over micro-batches and ranks alike (max: ratio_max).
            for key in ("ratio_max", "entropy", "logprob_gap_mean", "clip_fraction"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, key)
        assert single_w.keys() == weights.keys()
        # Adam turns float-ordering noise in near-zero gradients into full-size updates of a
        # few elements, so compare each tensor's update as a whole.
        for key, value in single_w.items():
            update = value - initial[key]
            error = (weights[key] - value).norm() / update.norm()
            assert error < 1e-3, f"{name} {key}: relative error {error:.2e}"


def test_world_size_mismatch_says_what_to_change():
    from policy.parallel import ParallelConfigError, ParallelDims

    ParallelDims(dp_replicate=2, dp_shard=2).check_world(4)
    with pytest.raises(
        ParallelConfigError, match="has 3 processes, but the config asks for 2 x 2 = 4"
    ):
        ParallelDims(dp_replicate=2, dp_shard=2).check_world(3)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_bfloat16_compute_stays_close_to_float32(tmp_path, tiny_model_dir):
    exact, _ = _run(tmp_path, tiny_model_dir, "fp32", 1, "train.train_policy.mini_batch=24")
    mixed, weights = _run(
        tmp_path, tiny_model_dir, "bf16", 2, "policy.parallelism.dp_shard_size=2",
        "train.param_dtype=\"bfloat16\"", "train.train_policy.mini_batch=12",
    )  # fmt: skip
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32
    for a, b in zip(exact, mixed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=5e-3)
        assert b["ratio_mean"] == pytest.approx(a["ratio_mean"], rel=2e-2)
