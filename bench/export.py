"""Benchmark: Gantry's export of an FSDP2-sharded policy against a plain
`safetensors.torch.save_file` of the same full tensors, measured in the same run.

    .venv/bin/python bench/export.py [--params 100e6] [--repeats 3] [--max-shard-size 100MB]

It builds a random Qwen2-architecture model of about `--params` parameters from a config (no
download; the 32k-token embeddings alone are ~49M) and saves it to a temporary directory. Then
2 gloo ranks (torchrun, started by this script) load it sharded with FSDP2 and, in alternation
so that both sides meet the same machine load, time on rank 0
  (a) baseline: `save_file` of the same full tensors, held by rank 0 alone (one process),
      sharded by the same plan as the export;
  (b) Gantry: `export_hf` on both ranks: rank 0 creates the shard files (headers, full size),
      then each rank writes its own FSDP2 rows into them at their offsets (`os.pwrite`; no
      tensor crosses the process group), and rank 0 adds index, config and tokenizer; timed
      on rank 0 from a barrier to the end of the call, whose last step waits for every rank;
  (c) for reference, the usual FSDP2 export: the full state dict gathered to rank 0
      (`get_model_state_dict(full_state_dict=True)`), then `save_file`.
Before each timed run dirty pages are flushed (`os.sync`), so no run pays for another's
writeback. It prints the medians and their ratio against the goal (Gantry <= 1.3x the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `gantry` and `policy` importable

GOAL_RATIO = 1.3
VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 32000, 768, 2048, 12, 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="model size to aim for")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--max-shard-size", default="100MB", help="bound of each shard file")
    parser.add_argument("--ranks", type=int, default=2, help="FSDP2 ranks of the Gantry side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


def qwen2_config(num_layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_model_dir(path: Path, params: float) -> int:
    """Save a random Qwen2 of about `params` parameters (and a tokenizer) to `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    from gantry.models.tiny import build_tokenizer

    def count(layers: int) -> int:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(qwen2_config(layers))
        return sum(p.numel() for p in model.parameters())

    per_layer = count(2) - count(1)
    layers = max(1, round((params - (count(1) - per_layer)) / per_layer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen2_config(layers), dtype=torch.float32)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def save_baseline(state: dict, shards: list, out: Path) -> None:
    """save_file of full tensors held by one process, shard by shard."""
    from safetensors.torch import save_file

    from policy.export import SHARD_NAME

    for i, shard in enumerate(shards):
        filename = SHARD_NAME.format(index=i + 1, total=len(shards))
        tensors = {spec.name: state[spec.name] for spec in shard}
        save_file(tensors, out / filename, metadata={"format": "pt"})


def run_ranks(args: argparse.Namespace, model_dir: Path, scratch: Path) -> dict:
    """Start this script as `--worker` on `args.ranks` gloo ranks; returns rank 0's figures."""
    result = scratch / "figures.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.ranks}", __file__, "--worker", "--model-dir", str(model_dir),
        "--scratch", str(scratch), "--result", str(result), "--repeats", str(args.repeats),
        "--max-shard-size", args.max_shard_size,
    ]  # fmt: skip
    # One thread per rank: the two ranks share the machine's two cores.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=1800)
    return json.loads(result.read_text())


def worker(args: argparse.Namespace) -> None:
    """One rank: load the model sharded with FSDP2, then time the baseline and the export in
    alternation, so that both meet the same machine load and page-cache state."""
    import torch.distributed as dist

    from policy.export import (
        ExportStats,
        export_hf,
        parse_size,
        plan_shards,
        specs_of,
        state_entries,
    )
    from policy.parallel import (
        ParallelDims,
        ShardingOptions,
        build_mesh,
        init_distributed,
        load_sharded_model,
    )

    env = init_distributed()
    mesh = build_mesh(ParallelDims(dp_replicate=1, dp_shard=env.world_size), env.device)
    model = load_sharded_model(args.model_dir, mesh, ShardingOptions())
    shards = plan_shards(specs_of(state_entries(model)), parse_size(args.max_shard_size))
    # The baseline's full tensors: the same values, read back from the saved checkpoint.
    state = _full_state(Path(args.model_dir)) if env.is_main else None
    times: dict[str, list] = {"baseline": [], "gantry": [], "dcp": []}
    stats = ExportStats()
    for run in range(args.repeats):
        sides = ("baseline", "gantry", "dcp")
        for side in sides if run % 2 == 0 else sides[::-1]:
            out = Path(args.scratch) / f"{side}-{run}"
            if env.is_main:
                out.mkdir()
                os.sync()  # start each timed write with no dirty pages left by the last one
            dist.barrier()
            started = time.perf_counter()
            if side == "gantry":
                export_hf(
                    model, args.model_dir, out, max_shard_size=args.max_shard_size, stats=stats
                )
            elif side == "dcp":
                gather_then_save(model, shards, out)
            elif env.is_main:
                save_baseline(state, shards, out)
            if env.is_main:
                times[side].append(time.perf_counter() - started)
                shutil.rmtree(out)
    if env.is_main:
        figures = {**times, "shards": len(shards), "peak_held_bytes": stats.peak_held_bytes}
        Path(args.result).write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: a gloo run-loop thread still releasing the last
    # collective's tensors then can abort the process (torch 2.13).
    sys.stdout.flush()
    os._exit(0)


def gather_then_save(model, shards: list, out: Path) -> None:
    """The usual FSDP2 export, for reference: the full state dict gathered to rank 0's CPU
    (torch.distributed.checkpoint), then save_file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if state:  # empty on the other ranks
        save_baseline(state, shards, out)


def _full_state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="gantry-bench-export-") as tmp:
        scratch = Path(tmp)
        model_dir = scratch / "model"
        n_params = build_model_dir(model_dir, args.params)
        load_before = os.getloadavg()[0]
        figures = run_ranks(args, model_dir, scratch)
    figures["load"] = (load_before, os.getloadavg()[0])
    report(args, n_params, figures)


def report(args: argparse.Namespace, n_params: int, figures: dict) -> None:
    base, ours = statistics.median(figures["baseline"]), statistics.median(figures["gantry"])
    ratio = ours / base
    print(
        f"model: Qwen2 {n_params / 1e6:.1f}M params, fp32 ({n_params * 4 / 1e6:.0f} MB), "
        f"{figures['shards']} shards of <= {args.max_shard_size}, {args.repeats} runs each"
    )
    print(
        f"baseline save_file, 1 process, full state dict: median {base:.3f}s",
        _runs(figures["baseline"]),
    )
    print(
        f"gantry export_hf, {args.ranks} gloo ranks, FSDP2:     median {ours:.3f}s",
        _runs(figures["gantry"]),
        f"(rank 0 peak held {figures['peak_held_bytes'] / 1e6:.1f} MB)",
    )
    dcp = statistics.median(figures["dcp"])
    print(
        f"reference: full state dict to rank 0 (DCP) + save_file: median {dcp:.3f}s",
        _runs(figures["dcp"]),
        f"(gantry is {ours / dcp:.2f}x of it)",
    )
    print("machine load (1-min average) before / after: {:.2f} / {:.2f}".format(*figures["load"]))
    verdict = "PASS" if ratio <= GOAL_RATIO else "FAIL"
    print(f"ratio gantry / baseline: {ratio:.2f}x (goal <= {GOAL_RATIO}x): {verdict}")


def _runs(times: list) -> str:
    return "[" + ", ".join(f"{t:.3f}" for t in times) + "]"


if __name__ == "__main__":
    main()
