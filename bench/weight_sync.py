"""Benchmark: Gantry's weight sync (FSDP2 policy -> rollout ranks) against a raw
torch.distributed broadcast of the same bytes, measured in the same run by the same processes.

    .venv/bin/python bench/weight_sync.py [--sizes tiny,0.5b] [--repeats 5] [--dtype float32]

Per model it starts 2 policy ranks (torchrun, FSDP2 on a 1-D mesh, the weights of a saved model)
and 2 rollout receivers (replicas "0" and "1" of one rank each, separate processes, each with a
`WeightReceiver` whose `load` drops what it gets: no engine). Models: `tiny` (the test model)
and `0.5b` (random weights, shaped like Qwen2.5-0.5B; built once into --work-dir). Sides:
  gantry  `PolicySender.send` on both policy ranks (each broadcasts its own FSDP rows, in
          buckets of --bucket-mb, to both receivers) against `WeightReceiver.receive`;
  raw     one group of policy rank 0 + the 2 receivers: rank 0 broadcasts one flat tensor of
          exactly the manifest's bytes and dtype, `group.broadcast(t, 0).wait()`;
  raw-bk  the same bytes as views of that tensor, one broadcast per Gantry bucket.
Every process stamps the wall clock (`time.time()`, one machine) right before it enters a sync
(for Gantry: `send` / `receive`, whose first step is the check-in) and when it is done; a
sync's time runs from the last member's entry to the last receiver's end: it includes Gantry's
check-in, not the skew between members. Each side first syncs once untimed (group formation),
then --repeats times, the sides alternating in order. Prints medians, minima, GB/s (manifest
bytes / time) and the ratio raw / gantry of the medians against the goal (>= 0.9x); it exits
non-zero only on errors. With >= 4 GPUs every process gets its own and the groups use NCCL;
otherwise the GPUs are hidden and all runs on CPU with gloo, one thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `gantry` and `policy` importable

GOAL_RATIO = 0.9
SIDES = ("gantry", "raw", "raw-bk")
POLICY_RANKS = 2
RECEIVERS = ("0", "1")  # rollout replicas of one rank each
TIMEOUT_S = 600.0
QWEN_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1000000.0, tie_word_embeddings=True, dtype="float32",
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,0.5b", help="comma-separated: tiny, 0.5b")
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs of each side")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--bucket-mb", type=float, help="default: DEFAULT_BUCKET_BYTES")
    parser.add_argument("--work-dir", default="/tmp/gantry-bench-weight-sync", help="model cache")
    for hidden in ("--role", "--replica", "--model-dir", "--scratch", "--port"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def model_dir(work: Path, size: str) -> Path:
    """The model of `size` under `work`, built (random weights, no download) unless cached."""
    from gantry.models.tiny import ensure_tiny_model

    if size == "tiny":
        return ensure_tiny_model(work / "tiny")
    if size != "0.5b":
        raise SystemExit(f"unknown size {size!r}: use tiny or 0.5b")
    path = work / "qwen2-0.5b-random"
    if not (path / "config.json").exists():
        import shutil

        import torch
        from transformers import AutoModelForCausalLM, Qwen2Config

        print(f"building a random Qwen2.5-0.5B-shaped model in {path} (once)", flush=True)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN_05B), dtype=torch.float32)
        model.save_pretrained(tmp)
        tmp.rename(path)  # complete or absent
    return path


def sync_plan(port: str):
    from gantry.comm.protocol import Receiver, SyncPlan

    receivers = [Receiver(replica=r, ranks=1) for r in RECEIVERS]
    return SyncPlan(group="bench/sync", host="127.0.0.1", port=int(port), receivers=receivers,
                    timeout_s=TIMEOUT_S)  # fmt: skip


class RawBroadcast:
    """The baseline: policy rank 0 broadcasts the manifest's bytes to the receivers, as one flat
    tensor or as one view of it per Gantry bucket. Its group is formed at first use, once the
    untimed Gantry sync has brought the store up; its buffers are allocated once."""

    def __init__(self, store_of, rank: int, manifest, device) -> None:
        self.store_of, self.rank, self.manifest, self.device = store_of, rank, manifest, device
        self.group = None

    def _ready(self) -> None:
        import torch

        from gantry.comm.weights import create_group

        if self.group is None:
            world = 1 + len(RECEIVERS)
            self.group = create_group(self.store_of(), "bench/raw", self.rank, world, TIMEOUT_S)
            dtype = self.manifest.entries[0].torch_dtype
            numel = self.manifest.total_bytes // dtype.itemsize
            self.flat = torch.empty(numel, dtype=dtype, device=self.device)
            if self.rank == 0:
                self.flat.uniform_()  # real pages, not the zero page
            sizes = [bucket.numel for bucket in self.manifest.buckets]
            self.views = self.flat.split(sizes)

    def whole(self, _version: int) -> None:
        self._ready()
        self.group.broadcast(self.flat, 0).wait()

    def bucketed(self, _version: int) -> None:
        self._ready()
        for work in [self.group.broadcast(view, 0) for view in self.views]:
            work.wait()


def measure(args, store_of, who: str, ops: dict, device) -> None:
    """The untimed (index 0) and timed syncs of each side in `ops`, stamped into the store."""
    import torch

    for i in range(args.repeats + 1):
        for side in [s for s in (SIDES if i % 2 == 0 else SIDES[::-1]) if s in ops]:
            start = time.time()
            ops[side](i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            store_of().set(f"bench/{side}/{i}/{who}", json.dumps([start, time.time()]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    store_of().set(f"bench/rss/{who}", str(rss))


def policy_worker(args) -> None:
    import torch.distributed as dist

    from policy import parallel
    from policy.export import tied_weight_names
    from policy.weight_sync import PolicySender

    env = parallel.init_distributed()
    dims = parallel.ParallelDims(dp_replicate=1, dp_shard=env.world_size)
    mesh = parallel.build_mesh(dims, env.device)
    model = parallel.load_sharded_model(args.model_dir, mesh, parallel.ShardingOptions())
    tied = tied_weight_names(model)
    params = {n: p for n, p in model.named_parameters() if n not in tied}
    sender = PolicySender(
        params, mesh, dtype=args.dtype, is_store_host=env.is_main, bucket_bytes=args.bucket_bytes
    )
    manifest, plan, scratch = sender.manifest, sync_plan(args.port), Path(args.scratch)
    if env.is_main:
        (scratch / "manifest.tmp").write_text(manifest.to_json())
        (scratch / "manifest.tmp").rename(scratch / "manifest.json")

    def store():  # hosted by rank 0, connected at the first send
        return sender.sender.store

    ops = {"gantry": lambda version: sender.send(plan, version)}
    if env.is_main:
        raw = RawBroadcast(store, 0, manifest, env.device)
        ops |= {"raw": raw.whole, "raw-bk": raw.bucketed}
    measure(args, store, f"policy{env.rank}", ops, env.device)
    if env.is_main:
        figures = collect(args, store(), env.world_size)
        figures |= {"params": sum(e.numel for e in manifest.entries)}
        figures |= {"bytes": manifest.total_bytes, "buckets": len(manifest.buckets)}
        (scratch / "figures.json").write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip finalization: gloo threads releasing tensors can abort it (torch 2.13)


def collect(args, store, senders: int) -> dict:
    """Per side, the time of each timed sync: last member's entry to last receiver's end."""
    receivers = [f"receiver{r}" for r in RECEIVERS]
    policy = [f"policy{r}" for r in range(senders)]
    figures: dict = {side: [] for side in SIDES}
    for side in SIDES:
        members = receivers + (policy if side == "gantry" else policy[:1])
        for i in range(1, args.repeats + 1):
            stamps = {m: json.loads(store.get(f"bench/{side}/{i}/{m}")) for m in members}
            end = max(stamps[m][1] for m in receivers)
            figures[side].append(end - max(start for start, _ in stamps.values()))
    figures["rss"] = {m: int(store.get(f"bench/rss/{m}")) for m in policy + receivers}
    return figures


def receiver_worker(args) -> None:
    import torch

    from gantry.comm.weights import Manifest, WeightReceiver

    index = RECEIVERS.index(args.replica)
    device = torch.device("cuda", POLICY_RANKS + index) if args.gpu else torch.device("cpu")
    if args.gpu:
        torch.cuda.set_device(device)
    path, deadline = Path(args.scratch) / "manifest.json", time.monotonic() + TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the policy ranks wrote no {path}")
        time.sleep(0.05)
    text = path.read_text()
    plan, receiver = sync_plan(args.port), WeightReceiver(device)

    def store():  # connected at the first sync
        return receiver.receiver.store

    raw = RawBroadcast(store, 1 + index, Manifest.from_json(text), device)
    ops = {
        "gantry": lambda v: receiver.receive(plan, text, v, args.replica, 0, lambda weights: None),
        "raw": raw.whole,
        "raw-bk": raw.bucketed,
    }
    measure(args, store, f"receiver{args.replica}", ops, device)
    sys.stdout.flush()
    os._exit(0)


def run_size(args, model: Path, gpu: bool, env: dict) -> dict:
    """Run the receivers and the torchrun policy ranks on one model; returns rank 0's figures.
    Raises if any of them fails (the others are then stopped)."""
    from gantry.launch.redis_server import free_port

    with tempfile.TemporaryDirectory(prefix="run-", dir=args.work_dir) as scratch:
        common = [
            "--model-dir", str(model), "--scratch", scratch, "--port", str(free_port()),
            "--repeats", str(args.repeats), "--dtype", args.dtype,
            "--bucket-mb", repr(args.bucket_bytes / 2**20), *(["--gpu"] if gpu else []),
        ]  # fmt: skip
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={POLICY_RANKS}", str(SCRIPT), "--role", "policy"]  # fmt: skip
        receiver = [sys.executable, str(SCRIPT), "--role", "receiver", "--replica"]
        procs = {
            "policy ranks (torchrun)": subprocess.Popen([*torchrun, *common], cwd=ROOT, env=env)
        }
        for r in RECEIVERS:
            procs[f"receiver {r}"] = subprocess.Popen([*receiver, r, *common], cwd=ROOT, env=env)
        try:
            while failed := {name: p.returncode for name, p in procs.items() if p.poll() != 0}:
                if any(code is not None for code in failed.values()):
                    raise RuntimeError(f"bench processes failed (exit codes): {failed}")
                time.sleep(0.2)
        finally:
            for p in procs.values():  # only ours, and only those still running after a failure
                if p.poll() is None:
                    p.terminate()  # torchrun passes it on to its ranks
                    p.wait(timeout=60)
        return json.loads((Path(scratch) / "figures.json").read_text())


def report(args, size: str, backend: str, figures: dict) -> None:
    nbytes, buckets = figures["bytes"], figures["buckets"]
    print(
        f"\n== {size}: {figures['params'] / 1e6:.1f}M params, {args.dtype}, {nbytes / 1e6:.1f} MB "
        f"in {buckets} bucket(s) of <= {args.bucket_bytes / 2**20:g} MiB; {POLICY_RANKS} FSDP2 "
        f"senders -> {len(RECEIVERS)} receivers, {backend}; {args.repeats} timed syncs per side"
    )
    labels = dict(zip(SIDES, ["gantry PolicySender.send", "raw broadcast, 1 tensor",
                              f"raw broadcast, {buckets} bucket(s)"], strict=True))  # fmt: skip
    medians = {side: statistics.median(figures[side]) for side in SIDES}
    for side in SIDES:
        times, median = figures[side], medians[side]
        print(
            f"  {labels[side]:<28} median {median:.4f}s  min {min(times):.4f}s  "
            f"{nbytes / median / 1e9:6.2f} GB/s  [{', '.join(f'{t:.4f}' for t in times)}]"
        )
    rss = ", ".join(f"{who} {value / 2**30:.2f}" for who, value in figures["rss"].items())
    print(f"  peak RSS (GiB): {rss}")
    ratio = medians["raw"] / medians["gantry"]
    verdict = "PASS" if ratio >= GOAL_RATIO else "FAIL"
    print(f"  ratio raw / gantry (medians): {ratio:.2f}x (goal >= {GOAL_RATIO}x): {verdict}")


def main() -> None:
    args = parse_args()
    from gantry.comm.weights import DEFAULT_BUCKET_BYTES

    mb = args.bucket_mb
    args.bucket_bytes = int(mb * 2**20) if mb is not None else DEFAULT_BUCKET_BYTES
    if args.role == "policy":
        return policy_worker(args)
    if args.role == "receiver":
        return receiver_worker(args)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu = gpus >= POLICY_RANKS + len(RECEIVERS)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["TQDM_DISABLE"] = "1"  # no weight-loading progress bars from the ranks
    if gpus and not gpu:
        print(f"the GPU (NCCL) variant needs 4 GPUs, this machine has {gpus}: running on CPU")
        env["CUDA_VISIBLE_DEVICES"] = ""  # the communicator picks NCCL whenever CUDA is seen
    backend = "NCCL, one GPU per process" if gpu else "gloo on CPU, one thread per process"
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for size in (s.strip() for s in args.sizes.split(",")):
        report(args, size, backend, run_size(args, model_dir(work, size), gpu, env))


if __name__ == "__main__":
    main()
