"""The safetensors export loads with transformers and gives the trained model's logits, from one
process and from an FSDP2-sharded model on gloo ranks (2, 3, HSDP 2x2), holding at most one
tensor's worth of received data at a time."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gantry.checkpoints import prune_step_dirs
from policy.export import (
    INDEX_NAME,
    ExportStats,
    StreamingShardWriter,
    TensorSpec,
    export_hf,
    parse_size,
    plan_shards,
)
from tests.distributed_helpers import run_ranks

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 2]])


def _load_shards(out) -> dict[str, torch.Tensor]:
    index = json.loads((out / INDEX_NAME).read_text())
    tensors = {}
    for filename in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / filename))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip(tmp_path, tiny_model_dir, tiny_tied_model_dir, tied):
    source = tiny_tied_model_dir if tied else tiny_model_dir
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():  # "train" it: the export must carry the new weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = export_hf(model, source, tmp_path / "export", max_shard_size=200_000)
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert ("lm_head.weight" in index["weight_map"]) is not tied
    assert not (out.parent / "export.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
    assert (
        AutoTokenizer.from_pretrained(out)("1 + 2")["input_ids"]
        == AutoTokenizer.from_pretrained(source)("1 + 2")["input_ids"]
    )


def test_single_shard_export_still_has_an_index(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = export_hf(model, tiny_model_dir, tmp_path / "one")
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    AutoModelForCausalLM.from_pretrained(out)


def test_single_process_export_holds_one_tensor_at_a_time(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stats = ExportStats()
    export_hf(model, tiny_model_dir, tmp_path / "e", max_shard_size=300_000, stats=stats)
    assert stats.shards > 2 and stats.total_bytes > 4 * stats.largest_tensor_bytes
    assert stats.peak_held_bytes == stats.largest_tensor_bytes


def test_export_keeps_the_weights_dtype_and_copies_processor_files(tmp_path, tiny_model_dir):
    source = tmp_path / "vlm-like"
    shutil.copytree(tiny_model_dir, source)
    (source / "preprocessor_config.json").write_text('{"image_processor_type": "X"}\n')
    (source / "chat_template.json").write_text('{"chat_template": "{{ 1 }}"}\n')
    # Cast after loading: the config still says float32, the export must say what it holds.
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).bfloat16()
    out = export_hf(model, source, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in _load_shards(out).values()} == {torch.bfloat16}
    for name in ("preprocessor_config.json", "chat_template.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not (out / "video_preprocessor_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16


def test_a_failed_export_leaves_the_previous_one_in_place(tmp_path, tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = export_hf(model, tiny_model_dir, tmp_path / "final")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_tokenizer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", broken_tokenizer)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tiny_model_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_plan_keeps_shards_consecutive_and_bounded():
    sizes = [40, 40, 150, 10, 30, 30, 60]  # bytes of uint8 tensors; 150 is over the limit
    specs = [TensorSpec(f"t{i}", (n,), torch.uint8) for i, n in enumerate(sizes)]
    shards = plan_shards(specs, max_shard_bytes=100)
    assert [[s.name for s in shard] for shard in shards] == [
        ["t0", "t1"], ["t2"], ["t3", "t4", "t5"], ["t6"],
    ]  # fmt: skip


def test_streamed_shards_load_with_safetensors_in_any_arrival_order(tmp_path):
    torch.manual_seed(0)
    state = {  # mixed element sizes with odd counts: the layout must keep each tensor aligned
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "b.f32": torch.randn(7),
        "c.i64": torch.arange(3),
        "d.bool": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
    }
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    shards = plan_shards(specs, max_shard_bytes=64)
    writer = StreamingShardWriter(tmp_path, shards)
    for name in reversed(state):
        writer.write(name, state[name])
    writer.close()
    loaded = _load_shards(tmp_path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    for path in tmp_path.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_max_shard_size_reads_like_transformers():
    assert parse_size(1234) == 1234
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 MiB") == 1.5 * 2**20
    with pytest.raises(ValueError, match="2GB"):
        parse_size("2 gigs")


def test_prune_keeps_the_newest_step_exports(tmp_path):
    for step in (2, 10, 4, 8):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / "final").mkdir()
    deleted = prune_step_dirs(tmp_path, keep=2, complete_only=False)
    assert sorted(p.name for p in deleted) == ["step_2", "step_4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "step_10", "step_8"]
    assert prune_step_dirs(tmp_path, keep=-1, complete_only=False) == []


# --- FSDP2 on 2 gloo ranks ------------------------------------------------------------------

RANK_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from policy.export import ExportStats, export_hf
from policy.parallel import (
    ParallelDims, ShardingOptions, build_mesh, init_distributed, load_sharded_model,
)

model_dir, out_dir, ref_path, stats_path, max_shard, dtype_name, replicas, mode = sys.argv[1:9]
dtype, replicas = getattr(torch, dtype_name), int(replicas)
env = init_distributed(timeout_s=120)
dims = ParallelDims(dp_replicate=replicas, dp_shard=env.world_size // replicas)
mesh = build_mesh(dims, env.device)
model = load_sharded_model(model_dir, mesh, ShardingOptions(dtype, dtype, dtype))
# One real optimizer step, on different data per rank, so every rank's shard changes.
torch.manual_seed(1 + env.rank)
ids = torch.randint(0, model.config.vocab_size, (2, 12))
model(input_ids=ids, labels=ids).loss.backward()
torch.optim.AdamW(model.parameters(), lr=1e-2).step()
reference = get_model_state_dict(
    model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
)
if env.rank == 0:
    torch.save(reference, ref_path)
del reference
stats = ExportStats()
if mode == "fail":  # rank 0 cannot write there: every rank must raise, none may hang
    try:
        export_hf(model, model_dir, out_dir, max_shard_size=int(max_shard))
    except (OSError, RuntimeError) as err:
        print(f"rank {env.rank} raised {type(err).__name__}", flush=True)
    else:
        raise SystemExit(f"rank {env.rank}: the export did not fail")
else:
    path = export_hf(model, model_dir, out_dir, max_shard_size=int(max_shard), stats=stats)
    assert (path is not None) == (env.rank == 0), (env.rank, path)
    if env.rank == 0:
        stats.path = str(stats.path)
        with open(stats_path, "w") as f:
            json.dump(vars(stats), f)
dist.destroy_process_group()
# Skip interpreter finalization: with torch 2.13 a gloo run-loop thread may still be releasing
# the last collective's tensors then, and taking the GIL during finalization aborts the
# process ("terminate called without an active exception"), ~1 run in 5 after many gathers.
sys.stdout.flush()
os._exit(0)
"""

MAX_SHARD = 300_000


@pytest.fixture(scope="session")
def odd_vocab_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with 515 embedding rows: FSDP2's shards of them are uneven."""
    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("tiny-odd-vocab")
    for file in tiny_model_dir.iterdir():
        if "token" in file.name or file.name == "chat_template.jinja":
            shutil.copy(file, path / file.name)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.vocab_size = 515
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


SHARDED_CASES = {  # name: (tied, dtype, ranks, replicas)
    "2-ranks-fp32-odd-vocab": (False, "float32", 2, 1),
    "2-ranks-tied-bf16": (True, "bfloat16", 2, 1),
    "3-ranks-fp32-odd-vocab": (False, "float32", 3, 1),
    "hsdp-2x2-fp32": (False, "float32", 4, 2),
}


@pytest.fixture(scope="module", params=list(SHARDED_CASES))
def sharded_export(request, tmp_path_factory, odd_vocab_model_dir, tiny_tied_model_dir):
    """Export an FSDP2 model trained one step; (source, export, reference, stats, case)."""
    tied, dtype, ranks, replicas = SHARDED_CASES[request.param]
    source = tiny_tied_model_dir if tied else odd_vocab_model_dir
    tmp = tmp_path_factory.mktemp("sharded-export")
    script = tmp / "rank.py"
    script.write_text(RANK_SCRIPT)
    out, ref, stats = tmp / "export", tmp / "reference.pt", tmp / "stats.json"
    args = [source, out, ref, stats, MAX_SHARD, dtype, replicas, "export"]
    result = run_ranks(script, ranks, args, timeout=240)
    assert "all-gathering instead" not in result.stderr  # the shards came point to point
    return source, out, torch.load(ref), json.loads(stats.read_text()), tied, dtype


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_sharded_export_gives_the_trained_models_logits(sharded_export):
    source, out, reference, _, tied, dtype = sharded_export
    assert not out.with_name("export.tmp").exists()
    exported = _load_shards(out)
    assert ("lm_head.weight" in exported) is not tied
    assert set(exported) == set(reference) - ({"lm_head.weight"} if tied else set())
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    for name, tensor in exported.items():
        assert tensor.dtype == getattr(torch, dtype), name
        assert torch.equal(tensor, reference[name]), name
        assert not torch.equal(tensor.float(), original[name]), f"{name} was not trained"
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    expected = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    expected.load_state_dict(reference)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == getattr(torch, dtype)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected(IDS).logits)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_sharded_export_holds_one_gathered_tensor_at_a_time(sharded_export):
    _, out, _, stats, _, _ = sharded_export
    index = json.loads((out / INDEX_NAME).read_text())
    assert stats["shards"] == len(set(index["weight_map"].values())) > 2
    assert stats["total_bytes"] == index["metadata"]["total_size"]
    # The contract: never more than one shard plus one tensor. The streamed writer does better:
    # rank 0 holds its own shards plus at most one tensor's worth of received shards.
    assert stats["peak_held_bytes"] <= MAX_SHARD + stats["largest_tensor_bytes"]
    assert 0 < stats["peak_held_bytes"] <= stats["largest_tensor_bytes"]
    assert stats["total_bytes"] > 8 * stats["peak_held_bytes"]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_a_failure_on_rank_0_is_raised_on_every_rank(tmp_path, tiny_model_dir):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the export's parent directory should be")
    args = [tiny_model_dir, blocker / "export", tmp_path / "r.pt", tmp_path / "s.json"]
    result = run_ranks(script, 2, [*args, MAX_SHARD, "float32", 1, "fail"], timeout=240)
    assert "rank 0 raised" in result.stdout and "rank 1 raised RuntimeError" in result.stdout
