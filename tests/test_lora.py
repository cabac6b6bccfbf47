"""LoRA ([policy.lora], policy/lora.py): cosmos-rl's keys, the merge the rollout engines get,
exports (merged, and the adapter alone for peft), checkpoints that hold only the adapters and
resume exactly, and whole SFT / GRPO runs that change nothing but what the adapters reach.

The distributed cases run this file as a torchrun script (2 ranks, FSDP2 over gloo): `peer`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run by torchrun: the repository's packages
    sys.path.insert(0, str(ROOT))

from gantry.config.lora import LoraConfig  # noqa: E402

LORA = dict(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
IDS = [[3, 17, 40, 99, 5, 61, 7, 8, 120, 33], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _perturb(model, scale: float, seed: int) -> None:
    """Move every trainable (adapter) weight, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=torch.tensor(IDS)).logits


# ------------------------------------------------------------------------------ the config


def test_cosmos_keys_load_and_what_gantry_cannot_honour_is_one_line():
    from gantry.config.loader import ConfigError, load_config

    config = load_config(
        None,
        [
            "policy.lora.r=16",
            "policy.lora.lora_alpha=32",
            'policy.lora.target_modules="all-linear"',
        ],
    )
    lora = config.policy.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_rslora) == (16, 32.0, 0.0, False)
    assert lora.lora_names == ["default"] and lora.init_lora_weights is True
    assert load_config(None, []).policy.lora is None  # full training by default
    assert load_config(None, []).train.ckpt.export_lora_adapter is False
    refused = {
        "target_modules is required": [],
        "lora_path": ['policy.lora.lora_path="/adapter"'],
        "one adapter": ['policy.lora.lora_names=["a", "b"]'],
        "'pissa' is not implemented": ['policy.lora.init_lora_weights="pissa"'],
        "primary_adapter": ['policy.lora.primary_adapter="other"'],
    }
    for message, keys in refused.items():
        extra = [] if not keys else ['policy.lora.target_modules=["q_proj"]']
        with pytest.raises(ConfigError, match=message) as info:
            load_config(None, ["policy.lora.r=8", *extra, *keys])
        assert "\n" not in str(info.value)


def test_cosmos_matching_rules_pick_the_modules(tiny_model_dir):
    from policy.lora import LoraError, apply_lora

    model = apply_lora(_base(tiny_model_dir), LoraConfig(**LORA))
    targets = model.peft_config["default"].target_modules
    assert targets and all(n.endswith(("q_proj", "v_proj")) for n in targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    # substrings, as cosmos-rl matches them ("proj" reaches every projection)
    every = apply_lora(_base(tiny_model_dir), LoraConfig(target_modules=["proj"]))
    assert any("mlp.down_proj" in n for n in every.peft_config["default"].target_modules)
    linear = apply_lora(_base(tiny_model_dir), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in linear.peft_config["default"].target_modules
    with pytest.raises(LoraError, match="matches no linear layer"):
        apply_lora(_base(tiny_model_dir), LoraConfig(target_modules=["nothing_here"]))


def test_tied_embeddings_sync_and_export_without_the_head(tiny_tied_model_dir, tmp_path):
    from policy.export import export_hf, tied_weight_names
    from policy.lora import LoraError, apply_lora, merged_parameters

    with pytest.raises(LoraError, match="ties to its output head"):
        apply_lora(_base(tiny_tied_model_dir), LoraConfig(**LORA))
    model = apply_lora(_base(tiny_tied_model_dir), LoraConfig(target_modules="all-linear"))
    _perturb(model, 0.05, seed=2)
    assert "lm_head.weight" not in merged_parameters(model, tied_weight_names(model))
    out = export_hf(model, tiny_tied_model_dir, tmp_path / "merged")
    torch.testing.assert_close(_logits(_base(out)), _logits(model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- merge and exports (1 process)


def test_merged_weights_and_both_exports_give_the_adapted_models_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from policy.export import export_hf, tied_weight_names
    from policy.lora import apply_lora, merged_parameters

    model = apply_lora(_base(tiny_model_dir), LoraConfig(**LORA, use_rslora=True))
    _perturb(model, 0.05, seed=1)
    expected = _logits(model)
    merged = merged_parameters(model, tied_weight_names(model))
    base = _base(tiny_model_dir)
    assert set(merged) == set(base.state_dict()) - tied_weight_names(base)  # the HF names
    base.load_state_dict(merged, strict=False)
    torch.testing.assert_close(_logits(base), expected, rtol=0, atol=1e-5)

    out = export_hf(model, tiny_model_dir, tmp_path / "merged")
    torch.testing.assert_close(_logits(_base(out)), expected, rtol=0, atol=1e-5)
    adapter = export_hf(model, tiny_model_dir, tmp_path / "adapter", lora_adapter=True)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not any("base_layer" in k for k in load_file(adapter / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(_base(tiny_model_dir), adapter).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-5)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True


# --------------------------------------------------------- 2-rank FSDP2: sync, resume, export


def _torchrun(tmp_path: Path, *args: str, timeout: float = 240) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        __file__, *map(str, args),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _engine(backend: str, model_dir):
    if backend == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            str(model_dir), tp_size=1, max_model_len=256, dtype="float32",
            kv_cache_memory_bytes=64 << 20,
        )  # fmt: skip
    from rollout.hf_engine import HFEngine

    return HFEngine(str(model_dir))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "backend",
    [
        "transformers",
        pytest.param(
            "vllm",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU build of vLLM"),
        ),
    ],
)
def test_rollout_engine_gets_the_merged_weights_and_matches_the_adapted_policy(
    tmp_path, tiny_model_dir, backend
):
    """A rollout engine receives the merged weights of a 2-rank FSDP2 LoRA policy (plain and
    background syncs); its log-probs of what it samples equal the adapted (peft) policy's."""
    from peft import set_peft_model_state_dict

    from gantry.comm.protocol import Receiver, SyncPlan
    from gantry.launch.redis_server import free_port
    from policy.lora import apply_lora
    from rollout.engine import SamplingSettings
    from tests.sync_peers import wait_for, wait_for_manifest

    plan = SyncPlan(
        group="t/lora", host="127.0.0.1", port=free_port(),
        receivers=[Receiver(replica="0", ranks=1)], timeout_s=120.0,
    )  # fmt: skip
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        __file__, "sync", str(tiny_model_dir), str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = open(tmp_path / "policy.log", "w")  # noqa: SIM115 - closed with the process
    policy = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    engine = _engine(backend, tiny_model_dir)
    sampling = SamplingSettings(n=2, temperature=0.7, max_tokens=12, seed=3)
    prompts = [[5, 6, 7], [10, 11, 12, 13]]
    try:
        manifest = wait_for_manifest(tmp_path)
        assert '"model.layers.0.self_attn.q_proj.weight"' in manifest  # the base model's names
        assert "lora" not in manifest and "base_layer" not in manifest
        for version in (1, 2):
            engine.receive_weights(plan, manifest, version, "0")
            adapted = apply_lora(_base(tiny_model_dir), LoraConfig(**LORA)).eval()
            state = torch.load(wait_for(tmp_path / f"adapter_v{version}.pt"))
            assert not set_peft_model_state_dict(adapted, state).unexpected_keys
            worst = 0.0
            for prompt, completions in zip(
                prompts, engine.generate(prompts, sampling), strict=True
            ):
                for c in completions:
                    ids = torch.tensor([prompt + c.token_ids])
                    with torch.no_grad():
                        logits = adapted(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.7
                    mine = logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
                    worst = max(worst, (mine - torch.tensor(c.logprobs)).abs().max().item())
            assert worst < 1e-4, (version, worst)
        assert policy.wait(timeout=120) == 0, (tmp_path / "policy.log").read_text()[-4000:]
    finally:
        policy.kill()
        engine.close()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(400)
def test_checkpoint_holds_only_the_adapters_and_resumes_exactly(tmp_path, tiny_model_dir):
    import torch.distributed.checkpoint as dcp
    from peft import PeftModel
    from safetensors.torch import load_file

    _torchrun(tmp_path, "train", tiny_model_dir, tmp_path, "full")
    _torchrun(tmp_path, "train", tiny_model_dir, tmp_path, "resume")
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert set(resumed) == {"3", "4"}
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), (step, full, resumed)
    keys = dcp.FileSystemReader(tmp_path / "ckpt" / "policy").read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k or ".modules_to_save." in k for k in model_keys)
    assert not any("base_layer" in k or "embed_tokens" in k for k in keys)
    # The merged export: what the adapters reach changed, nothing else did.
    initial = _base(tiny_model_dir).state_dict()
    merged = {}
    for shard in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(shard))
    for name, value in merged.items():
        reached = name.endswith(("q_proj.weight", "v_proj.weight", "lm_head.weight"))
        assert torch.equal(value, initial[name]) != reached, name
    adapter = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(
        _logits(_base(tmp_path / "merged")), _logits(adapter), rtol=0, atol=1e-5
    )


# ------------------------------------------------------------------- runs through the launcher

TARGETS = 'policy.lora.target_modules=["q_proj", "v_proj"]'
RUNS = {
    "grpo": [
        "rollout.backend=transformers",
        "train.train_batch_per_replica=64", "train.train_policy.mini_batch=64",
        "rollout.n_generation=8", "rollout.batch_size=8",
        # rollouts of the weights just synced: the engine-policy gap is then numerical only
        "train.train_policy.allowed_outdated_steps=0",
    ],
    "sft": [
        "custom.size=200", "validation.enable=false",
        "train.train_batch_per_replica=16", "train.train_policy.mini_batch=8",
        "train.ckpt.export_lora_adapter=true",
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_a_lora_run_changes_only_what_the_adapters_reach(tmp_path, kind):
    """GRPO (merged export) and SFT (adapter export) through the launcher: the run is normal,
    the export holds the initial weights everywhere the adapters do not reach."""
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "gantry.launch", "--config", f"configs/quickstart-{kind}.toml",
        "datasets/arithmetic.py", *RUNS[kind],
        "train.max_num_steps=3", "logging.log_interval=1", "policy.lora.r=8",
        "policy.lora.lora_alpha=16", TARGETS, f'train.output_dir="{out}"',
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 3
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if "loss" in m]
    assert len(losses) == 3 and all(abs(x) < 100 for x in losses), steps
    model_path = json.loads((run_dir / "run.json").read_text())["model_path"]
    export = run_dir / "export" / "final"
    if kind == "grpo":
        assert all(m["logprob_gap_mean"] < 1e-4 for m in steps if "logprob_gap_mean" in m)
        initial, changed = _base(model_path).state_dict(), set()
        for shard in export.glob("*.safetensors"):
            for name, value in load_file(shard).items():
                if not torch.equal(value, initial[name]):
                    changed.add(name)
        assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
        return
    adapted = PeftModel.from_pretrained(_base(model_path), export).eval()
    assert not torch.allclose(_logits(adapted), _logits(_base(model_path)))  # it trained


# ---------------------------------------------------------------------------- torchrun peers


def _peer_setup(model_dir: str, lora: LoraConfig):
    from policy.parallel import (
        ParallelDims,
        ShardingOptions,
        build_mesh,
        init_distributed,
        load_sharded_model,
    )

    env = init_distributed()
    mesh = build_mesh(ParallelDims(1, env.world_size), env.device)
    torch.manual_seed(0)
    return env, mesh, load_sharded_model(model_dir, mesh, ShardingOptions(), lora)


def _perturb_shards(model, seed: int) -> None:
    from torch.distributed.tensor import DTensor

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                local = p.to_local() if isinstance(p, DTensor) else p
                local.add_(0.05 * torch.randn(local.shape, generator=generator))


def peer_sync(model_dir: str, out: Path) -> None:
    from gantry.comm.protocol import SyncPlan
    from policy.export import tied_weight_names
    from policy.lora import adapter_state, merged_parameters
    from policy.weight_sync import PolicySender
    from tests.sync_peers import save_atomic

    plan = SyncPlan.model_validate_json((out / "plan.json").read_text())
    env, mesh, model = _peer_setup(model_dir, LoraConfig(**LORA))
    tied = tied_weight_names(model)
    sender = PolicySender(
        lambda: merged_parameters(model, tied), mesh, dtype="float32", is_store_host=env.rank == 0
    )
    if env.rank == 0:
        (out / "manifest.json.tmp").write_text(sender.manifest.to_json())
        (out / "manifest.json.tmp").rename(out / "manifest.json")
    errors = []
    for version in (1, 2):
        _perturb_shards(model, seed=10 * version + env.rank)
        state = adapter_state(model)  # a collective
        if env.rank == 0:
            save_atomic(state, out / f"adapter_v{version}.pt")
        if version == 1:
            sender.send(plan, version)
        else:  # sent from a thread while training changes the adapters at once
            sender.send_in_background(plan, version, lambda: False, lambda _, e: errors.append(e))
            _perturb_shards(model, seed=99)
    sender.wait()
    assert errors == [None], errors


def _train_step(model, optimizer, scheduler, step: int, rank: int) -> float:
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 200, (2, 16), generator=generator)
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return total.item()


def peer_train(model_dir: str, out: Path, run: str) -> None:
    from policy.checkpoint import PolicyCheckpointer
    from policy.export import export_hf

    # dropout draws random numbers: the resumed run needs the checkpoint's RNG states
    env, _, model = _peer_setup(model_dir, LoraConfig(**LORA, lora_dropout=0.1))
    random.seed(env.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler)
    ckpt = PolicyCheckpointer(async_mode=False)
    path, first, losses = out / "ckpt" / "policy", 1, {}
    if run == "resume":
        first = ckpt.load(path, **state)[0] + 1
    for step in range(first, 5):
        losses[step] = _train_step(model, optimizer, scheduler, step, env.rank)
        if run == "full" and step == 2:
            ckpt.save(path, **state, step=step, extra={})
            ckpt.wait()
    ckpt.close()
    if run == "full":
        export_hf(model, model_dir, out / "merged")
        export_hf(model, model_dir, out / "adapter", lora_adapter=True)
    if env.rank == 0:
        (out / f"{run}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    role, model_path, out_dir = sys.argv[1:4]
    if role == "sync":
        peer_sync(model_path, Path(out_dir))
    else:
        peer_train(model_path, Path(out_dir), sys.argv[4])
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # torch 2.13's gloo can abort at shutdown (see policy/__main__.py)
