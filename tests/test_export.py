"""The safetensors export loads with transformers and gives the trained model's logits, from one
process and from an FSDP2-sharded model on gloo ranks (2, 3, HSDP 2x2) whose ranks write their
own rows in place (nothing gathered), or all-gather when they cannot; a failure on any rank is
raised on every rank and leaves the previous export in place."""

import json
import shutil
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gantry.run.checkpoints import prune_step_dirs
from policy.export import (
    INDEX_NAME,
    ExportStats,
    ShardFiles,
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


def test_single_process_export_copies_no_tensor(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stats = ExportStats()
    export_hf(model, tiny_model_dir, tmp_path / "e", max_shard_size=300_000, stats=stats)
    assert stats.shards > 2 and stats.total_bytes > 4 * stats.largest_tensor_bytes
    assert stats.peak_held_bytes == 0  # written from the parameters' own memory


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


def test_shard_files_written_in_pieces_in_any_order_load_with_safetensors(tmp_path):
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
    files = ShardFiles(tmp_path / "out", shards)
    files.create()
    for name in reversed(state):
        if name == "a.bf16":  # as two ranks would: rows 0-1, then row 2 at its byte offset
            files.write(name, state[name][2:], offset=2 * 5 * 2)
            files.write(name, state[name][:2])
        else:
            files.write(name, state[name])
    files.close()
    files.write_index()
    files.publish(tmp_path / "final")
    loaded = _load_shards(tmp_path / "final")
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert not (tmp_path / "final" / ".export-id").exists()
    for path in (tmp_path / "final").glob("*.safetensors"):
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


# --- FSDP2 on gloo ranks --------------------------------------------------------------------

RANK_SCRIPT = """
import errno, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from policy.export import ExportStats, ShardFiles, export_hf
from policy.parallel import (
    ParallelDims, ShardingOptions, build_mesh, init_distributed, load_sharded_model,
)

model_dir, out_dir, ref_path, stats_path, max_shard, dtype_name, replicas, mode = sys.argv[1:9]
dtype, replicas, max_shard = getattr(torch, dtype_name), int(replicas), int(max_shard)
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


def expect_failure():
    try:
        export_hf(model, model_dir, out_dir, max_shard_size=max_shard)
    except (OSError, RuntimeError) as err:
        print(f"rank {env.rank} raised {type(err).__name__}: {err}", flush=True)
    else:
        raise SystemExit(f"rank {env.rank}: the export did not fail")


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


if mode == "fail":  # rank 0 cannot write there: every rank must raise, none may hang
    expect_failure()
elif mode == "fail-last-rank":  # the last rank's disk is full: all raise, the old export stays
    first = export_hf(model, model_dir, out_dir, max_shard_size=max_shard)
    before = {p.name: p.read_bytes() for p in first.iterdir()} if env.rank == 0 else None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if env.rank == env.world_size - 1:
        ShardFiles.write = full_disk
    expect_failure()
    if env.rank == 0:
        after = {p.name: p.read_bytes() for p in Path(out_dir).iterdir()}
        debris = Path(out_dir + ".tmp").exists()
        print(f"previous export intact: {after == before and not debris}", flush=True)
else:
    if mode == "unshared" and env.rank != 0:  # as if out_dir were on this rank's own disk
        ShardFiles.sees = lambda self, export_id: False
    stats = ExportStats()
    path = export_hf(model, model_dir, out_dir, max_shard_size=max_shard, stats=stats)
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


SHARDED_CASES = {  # name: (tied, dtype, ranks, replicas, mode)
    "2-ranks-fp32-odd-vocab": (False, "float32", 2, 1, "export"),
    "2-ranks-tied-bf16": (True, "bfloat16", 2, 1, "export"),
    "3-ranks-fp32-odd-vocab": (False, "float32", 3, 1, "export"),
    "hsdp-2x2-fp32": (False, "float32", 4, 2, "export"),
    "2-ranks-unshared-fs-gathers": (False, "float32", 2, 1, "unshared"),
}


# Every case's setup (an FSDP2 model trained one step on 2-4 ranks, then exported) takes 5-20 s.
@pytest.fixture(
    scope="module", params=[pytest.param(c, marks=pytest.mark.slow) for c in SHARDED_CASES]
)
def sharded_export(request, tmp_path_factory, odd_vocab_model_dir, tiny_tied_model_dir):
    """Export an FSDP2 model trained one step; (source, export, reference, stats, tied, dtype,
    whether it gathered)."""
    tied, dtype, ranks, replicas, mode = SHARDED_CASES[request.param]
    source = tiny_tied_model_dir if tied else odd_vocab_model_dir
    tmp = tmp_path_factory.mktemp("sharded-export")
    script = tmp / "rank.py"
    script.write_text(RANK_SCRIPT)
    out, ref, stats = tmp / "export", tmp / "reference.pt", tmp / "stats.json"
    args = [source, out, ref, stats, MAX_SHARD, dtype, replicas, mode]
    result = run_ranks(script, ranks, args, timeout=240)
    gathered = mode == "unshared"
    assert ("all-gathering every sharded tensor" in result.stderr) == gathered, result.stderr
    return source, out, torch.load(ref), json.loads(stats.read_text()), tied, dtype, gathered


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_sharded_export_gives_the_trained_models_logits(sharded_export):
    source, out, reference, _, tied, dtype, _ = sharded_export
    assert not out.with_name("export.tmp").exists()
    assert not (out / ".export-id").exists()
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
def test_sharded_export_holds_nothing_beyond_the_shards(sharded_export):
    _, out, _, stats, _, _, gathered = sharded_export
    index = json.loads((out / INDEX_NAME).read_text())
    assert stats["shards"] == len(set(index["weight_map"].values())) > 2
    assert stats["total_bytes"] == index["metadata"]["total_size"]
    if gathered:  # the fallback: one full tensor at a time on rank 0
        assert 0 < stats["peak_held_bytes"] <= stats["largest_tensor_bytes"]
    else:  # every rank wrote its own rows from the shard's memory
        assert stats["peak_held_bytes"] == 0


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failure_on_rank_0_is_raised_on_every_rank(tmp_path, tiny_model_dir):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the export's parent directory should be")
    args = [tiny_model_dir, blocker / "export", tmp_path / "r.pt", tmp_path / "s.json"]
    result = run_ranks(script, 2, [*args, MAX_SHARD, "float32", 1, "fail"], timeout=240)
    assert "rank 0 raised" in result.stdout and "rank 1 raised RuntimeError" in result.stdout


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failure_on_another_rank_is_raised_on_every_rank(tmp_path, odd_vocab_model_dir):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    args = [odd_vocab_model_dir, tmp_path / "export", tmp_path / "r.pt", tmp_path / "s.json"]
    result = run_ranks(script, 3, [*args, MAX_SHARD, "float32", 1, "fail-last-rank"], timeout=240)
    assert "rank 2 raised OSError: [Errno 28] No space left on device" in result.stdout
    for rank in (0, 1):
        assert f"rank {rank} raised RuntimeError: export to " in result.stdout
    assert "failed on rank(s) [2]" in result.stdout
    assert "previous export intact: True" in result.stdout


ROWS_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from policy.export import ShardFiles, TensorSpec, own_pieces, plan_shards

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same full tensors on every rank
    full = {  # rows: fewer than ranks, uneven, one; a replicated scalar; bf16
        "two_rows": torch.randn(2, 3),
        "seven_rows": torch.randn(7, 5),
        "one_row": torch.randn(1),
        "scalar": torch.tensor(4.0),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
    }
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = {
        name: distribute_tensor(t, mesh, [Replicate() if t.dim() == 0 else Shard(0)])
        for name, t in full.items()
    }
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in full.items()]
    files = ShardFiles(Path(sys.argv[1]), plan_shards(specs, 64))
    if rank == 0:
        files.create()
    dist.barrier()
    written = 0
    for i, (name, value) in enumerate(sharded.items()):
        pieces = own_pieces(i, value, rank)
        assert pieces is not None, name
        written += sum(files.write(name, piece, offset) for offset, piece in pieces)
    files.close()
    total = torch.tensor([written])
    dist.all_reduce(total)
    assert total.item() == files.total_bytes, (total.item(), files.total_bytes)
    dist.barrier()
    if rank == 0:
        files.write_index()
        files.publish(Path(sys.argv[2]))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_each_rank_writes_its_rows_even_when_it_has_none(tmp_path):
    script = tmp_path / "rows.py"
    script.write_text(ROWS_SCRIPT)
    run_ranks(script, 3, [tmp_path / "out.tmp", tmp_path / "out"], timeout=120)
    torch.manual_seed(0)
    expected = {
        "two_rows": torch.randn(2, 3),
        "seven_rows": torch.randn(7, 5),
        "one_row": torch.randn(1),
        "scalar": torch.tensor(4.0),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
    }
    loaded = _load_shards(tmp_path / "out")
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_a_non_finite_weight_is_never_written(tmp_path):
    from gantry.run.errors import NonFiniteError

    state = {"w": torch.tensor([1.0, float("nan")]), "ids": torch.arange(2)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    files = ShardFiles(tmp_path / "out", plan_shards(specs, max_shard_bytes=64))
    files.create()
    files.write("ids", state["ids"])  # integers are never checked
    with pytest.raises(NonFiniteError, match="export: w holds NaN"):
        files.write("w", state["w"])
    files.abandon()
