"""Benchmark: does an async policy checkpoint slow training down while it is being written?

Two gloo ranks (the script starts them with torchrun) train a randomly initialised
Qwen2-architecture model (~58M parameters) sharded with FSDP2, with AdamW, on a fixed batch.
In each of a few rounds it times some steps (forward + backward + optimizer + `poll()`) with no
save in flight, then starts an async save (policy.checkpoint.PolicyCheckpointer) and times the
steps that run until the save is reported durable. It prints the two mean step times and their
ratio (goal: <= 1.1x, PASS/FAIL), the time `save()` blocks in async mode, how long the
background write takes, the wall and CPU time of a sync save of the same state, and how much
CPU other processes used meanwhile (the figures mean little when that is high).

    .venv/bin/python bench/async_checkpoint.py                      # thread and process writers
    .venv/bin/python bench/async_checkpoint.py --async-type thread  # one of them
    .venv/bin/python bench/async_checkpoint.py --nproc 1            # one rank: a spare core
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--async-type", choices=["thread", "process", "both"], default="both")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (one compute thread each)")
    parser.add_argument("--rounds", type=int, default=4, help="timed async saves")
    parser.add_argument("--baseline-steps", type=int, default=3, help="per round")
    parser.add_argument("--writer-niceness", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (from /proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(args: argparse.Namespace, async_type: str) -> dict:
    """Run the measurement on the ranks under torchrun; returns rank 0's figures."""
    with tempfile.TemporaryDirectory(prefix="gantry-bench-ckpt-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={args.nproc}", __file__, "--worker", "--out", str(out),
            "--async-type", async_type, "--rounds", str(args.rounds),
            "--baseline-steps", str(args.baseline_steps),
            "--writer-niceness", str(args.writer_niceness), "--seq-len", str(args.seq_len),
            "--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        ]  # fmt: skip
        # One compute thread per rank: 2 ranks on the 2 cores of the development machine.
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        wall, busy, ours = time.perf_counter(), machine_busy_s(), children_cpu_s()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        wall = time.perf_counter() - wall
        foreign = (machine_busy_s() - busy) - (children_cpu_s() - ours)
        result = json.loads(out.read_text())
        result["foreign_cores"] = max(0.0, foreign) / wall
        return result


def build(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from policy.parallel import (
        ParallelDims,
        ShardingOptions,
        build_mesh,
        init_distributed,
        shard_model,
    )

    env = init_distributed()
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        head_dim=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # the same random weights on every rank before sharding
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    shard_model(model, build_mesh(ParallelDims(1, env.world_size), env.device), ShardingOptions())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    gen = torch.Generator().manual_seed(env.rank)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=gen)
    return env, model, optimizer, scheduler, ids, n_params


def measure(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from policy.checkpoint import PolicyCheckpointer

    env, model, optimizer, scheduler, ids, n_params = build(args)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler)
    ckpt = PolicyCheckpointer(
        async_mode=True, async_type=args.async_type, writer_niceness=args.writer_niceness
    )
    sync = PolicyCheckpointer(async_mode=False)

    def step() -> tuple[float, list[Path]]:
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        reported = ckpt.poll()  # what the worker does every step; free with nothing in flight
        return time.perf_counter() - started, reported

    root = [Path(tempfile.mkdtemp(prefix="gantry-bench-ckpt-")) if env.rank == 0 else None]
    dist.broadcast_object_list(root, src=0)  # one directory for all ranks
    root = root[0]
    step()  # warm-up: allocator, first-step costs
    # The first async save also allocates the staging buffers (and starts the writer process
    # in process mode): not timed.
    ckpt.save(root / "warmup", **state, step=0, extra={})
    ckpt.wait()
    baseline, during, blocking, background, ratios = timed_rounds(args, ckpt, state, root, step)
    wall, cpu = time.perf_counter(), time.process_time()
    sync.save(root / "sync", **state, step=0, extra={})
    sync_s, sync_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    size = sum(f.stat().st_size for f in (root / "sync").iterdir())
    ckpt.close()
    sync.close()
    if env.rank == 0:
        shutil.rmtree(root)
        result = {
            "async_type": args.async_type,
            "nproc": env.world_size,
            "params_m": n_params / 1e6,
            "checkpoint_mb": size / 1e6,
            "baseline_step_s": statistics.mean(baseline),
            "during_step_s": statistics.mean(during),
            "steps_during": len(during),
            "rounds": args.rounds,
            "round_ratios": ratios,
            "save_blocking_s": statistics.mean(blocking),
            "background_s": statistics.mean(background),
            "sync_save_s": sync_s,
            "sync_save_cpu_s": sync_cpu_s,
        }
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


def timed_rounds(args: argparse.Namespace, ckpt, state: dict, root: Path, step) -> tuple:
    """Steps without a save, then steps while an async save is written, `args.rounds` times
    (rounds, so that drift in the machine's load hits both): (baseline step times, step times
    during saves, save blocking times, background write times, per-round ratios)."""
    baseline, during, blocking, background, ratios = [], [], [], [], []
    for i in range(args.rounds):
        before = [step()[0] for _ in range(args.baseline_steps)]
        started = time.perf_counter()
        ckpt.save(root / f"async_{i}", **state, step=i, extra={})
        blocking.append(ckpt.last_save_blocking_s)
        in_flight, reported = [], []
        while not reported:
            seconds, reported = step()
            in_flight.append(seconds)
        background.append(time.perf_counter() - started)
        ratios.append(statistics.mean(in_flight) / statistics.mean(before))
        baseline += before
        during += in_flight
    return baseline, during, blocking, background, ratios


def report(results: list[dict], niceness: int) -> None:
    for r in results:
        ratio = r["during_step_s"] / r["baseline_step_s"]
        verdict = "PASS" if ratio <= GOAL else "FAIL"
        # The ratio falls as a write spreads over more steps; the training time a save
        # costs is what to compare with the time a sync save holds training.
        lost = (r["during_step_s"] - r["baseline_step_s"]) * r["steps_during"] / r["rounds"]
        print(
            f"\nasync writer: {r['async_type']} (nice {niceness}), {r['nproc']} ranks, "
            f"{r['params_m']:.1f}M params, checkpoint {r['checkpoint_mb']:.0f} MB "
            f"(model + AdamW, all ranks)\n"
            f"  step, no save in flight    {r['baseline_step_s'] * 1e3:8.0f} ms\n"
            f"  step, async save in flight {r['during_step_s'] * 1e3:8.0f} ms "
            f"({r['steps_during']} steps)\n"
            f"  ratio                      {ratio:8.2f}x  goal <= {GOAL}x: {verdict} "
            f"(rounds: {', '.join(f'{x:.2f}' for x in r['round_ratios'])})\n"
            f"  training time lost a save  {lost * 1e3:8.0f} ms (sync save holds it "
            f"{r['sync_save_s'] * 1e3:.0f} ms)\n"
            f"  save() blocks (staging)    {r['save_blocking_s'] * 1e3:8.0f} ms\n"
            f"  async save until durable   {r['background_s'] * 1e3:8.0f} ms\n"
            f"  sync save                  {r['sync_save_s'] * 1e3:8.0f} ms "
            f"(rank 0 CPU {r['sync_save_cpu_s'] * 1e3:.0f} ms)\n"
            f"  other processes' load      {r['foreign_cores']:8.2f} cores "
            f"of {os.cpu_count()} (figures are unreliable when this is not ~0)"
        )


def main() -> None:
    args = parse_args()
    if args.worker:
        measure(args)
        return
    kinds = ["thread", "process"] if args.async_type == "both" else [args.async_type]
    report([launch(args, kind) for kind in kinds], args.writer_niceness)


if __name__ == "__main__":  # the process-based writer re-imports this file: guard it
    main()
