"""The GPU check: Gantry on one GPU (an H200) in one call of a few minutes; bench/gpu_check.sh runs it.

    python3 bench/gpu_check.py [--out DIR] [--work DIR] [--sft-steps 30] [--grpo-steps 10]
    python3 bench/gpu_check.py --plan      # print what it would run, import nothing heavy
    python3 bench/gpu_check.py --dry-run   # also validate the runs' configs (CPU is enough)
    python3 bench/gpu_check.py --tiny      # the whole check with a tiny model, no tests: a
                                           # smoke run of this script on CPU (~2 minutes)

Phases, each under its own time limit so that the whole fits 8 minutes:
  tests  the `gpu`-marked tests that need no vLLM (`-k "not vllm"`: vLLM does not travel to
         the GPU image), with a JUnit report;
  model  a randomly initialised Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 heads,
         2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings; 494M parameters)
         written in bfloat16 with the built-in tiny model's tokenizer (no hub);
  sft    the launcher on configs/quickstart-sft.toml (datasets/arithmetic.py) with that model
         in bfloat16: tokens/s and step time from metrics.jsonl;
  grpo   the launcher on configs/quickstart-grpo.toml with `rollout.backend = "transformers"`:
         on one GPU the policy and the rollout replica share the device
         (gantry.launch.nodes.shares_one_gpu) and their weight sync runs over gloo, since NCCL
         refuses two ranks of one communicator on one GPU (gantry.comm.sync_groups); with
         several GPUs the same check would put them on separate GPUs and sync over NCCL.
Peak GPU memory is read with nvidia-smi every 0.5 s during each run (all processes on the
device together). Figures go to OUT/gpu_check.json, each run's log to OUT/<phase>.log.
Figures are medians over the steps after the first two (start-up and the first sync).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QWEN25_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
TINY = {  # --tiny: head_dim 64 as Qwen2.5-0.5B's
    **QWEN25_05B,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "vocab_size": 1024,
}
LIMITS_S = {"tests": 120, "sft": 90, "grpo": 210}  # + ~30 s for the model: under 8 minutes
SKIPPED_STEPS = 2  # start-up and the first weight sync


def run_overrides(
    model_dir: Path, work: Path, sft_steps: int, grpo_steps: int, tiny: bool = False
) -> dict:
    """The launcher's arguments of each run: (config, dataset script, dotted overrides)."""
    common = [
        f'policy.model_name_or_path="{model_dir}"',
        f'train.output_dir="{work / "outputs"}"',
        'train.param_dtype="bfloat16"',
        "train.ckpt.enable_checkpoint=false",
        "train.ckpt.export_safetensors=false",
        'logging.logger=["console"]',
        "logging.log_interval=1",
    ]
    sft = [
        *common,
        f"train.max_num_steps={sft_steps}",
        "train.train_batch_per_replica=128",
        "train.train_policy.mini_batch=128",
        "validation.enable=false",
    ]
    grpo = [
        *common,
        f"train.max_num_steps={grpo_steps}",
        'rollout.backend="transformers"',
        'rollout.dtype="bfloat16"',
        # The transformers engine generates one prompt (its n samples) at a time, ~20 ms a
        # token for this model: 8 prompts x 32 tokens make a ~5 s step.
        "rollout.n_generation=16",
        "rollout.max_response_length=32",
        "rollout.batch_size=8",
        "train.train_batch_per_replica=128",
        "train.train_policy.mini_batch=128",
        "train.optm_lr=1e-6",
    ]
    if tiny:  # a CPU smoke run: float32 (no bfloat16 units), short completions, small steps
        smaller = ["rollout.max_response_length=8", "train.train_batch_per_replica=64"]
        smaller += ["train.train_policy.mini_batch=64"]
        cpu = ['train.param_dtype="float32"', 'rollout.dtype="float32"']
        grpo += [*cpu, *smaller]
        sft += cpu
    dataset = str(ROOT / "datasets" / "arithmetic.py")
    return {
        "sft": (str(ROOT / "configs" / "quickstart-sft.toml"), dataset, sft),
        "grpo": (str(ROOT / "configs" / "quickstart-grpo.toml"), dataset, grpo),
    }


def launcher_command(config: str, dataset: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "gantry.launch", "--config", config, dataset, *overrides]


def print_plan(runs: dict) -> None:
    tests = " ".join(gpu_test_files())
    print(f"  tests: pytest -m gpu -k 'not vllm' {tests}  (limit {LIMITS_S['tests']}s)")
    print("  model: a random Qwen2.5-0.5B-shaped Qwen2 in bfloat16 (" + _sizes() + ")")
    for name, (config, dataset, overrides) in runs.items():
        command = " ".join(launcher_command(config, dataset, overrides)[1:])
        print(f"  {name}: python3 {command}  (limit {LIMITS_S[name]}s)")


def _sizes() -> str:
    return ", ".join(f"{k}={v}" for k, v in QWEN25_05B.items())


def dry_run(runs: dict) -> None:
    """Validate each run's config as the launcher would, and place it on a one-GPU node."""
    from gantry.config import load_config
    from gantry.launch.nodes import node_plan
    from gantry.launch.placement import resolve_parallelism

    for name, (config, _dataset, overrides) in runs.items():
        resolved = resolve_parallelism(load_config(config, overrides), gpus=1)
        placed = node_plan(resolved, nnodes=1, gpus_per_node=1)[0]
        where = ", ".join(f"{p.name} on GPU {list(p.gpus)}" for p in placed if p.gpus)
        print(f"  {name}: config ok ({resolved.train.train_policy.type}, {where})")


def gpu_test_files() -> list[str]:
    """The test files that hold `gpu`-marked tests."""
    found = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]
    return [str(p.relative_to(ROOT)) for p in found]


class MemoryPeak:
    """The largest memory.used nvidia-smi reports for GPU 0 while it runs (MiB)."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> MemoryPeak:
        if shutil.which("nvidia-smi"):  # none on CPU (--tiny): the peak stays 0
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _poll(self) -> None:
        query = [
            "nvidia-smi",
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            "0",
        ]
        while not self.stop.wait(0.5):
            done = subprocess.run(query, capture_output=True, text=True, check=False)
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.peak_mib = max(self.peak_mib, int(done.stdout.strip()))


def run_logged(name: str, command: list[str], out: Path, limit_s: float) -> dict:
    """Run `command` with its output in OUT/<name>.log; its exit code, wall time, GPU peak."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out / f"{name}.log", "w") as log, MemoryPeak() as memory:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            os.killpg(process.pid, signal.SIGINT)  # the launcher stops its workers on ^C
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own group, workers included
                process.wait()
    wall = time.perf_counter() - started
    print(f"[gpu_check] {name}: exit {rc} in {wall:.0f}s, GPU peak {memory.peak_mib} MiB")
    return {"exit": rc, "wall_s": round(wall, 1), "gpu_peak_mib": memory.peak_mib}


def run_tests(out: Path) -> dict:
    report = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    command += ["-k", "not vllm", f"--junitxml={report}", *gpu_test_files()]
    result = run_logged("tests", command, out, LIMITS_S["tests"])
    if report.is_file():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            result[key] = int(suite.get(key, 0))
    return result


def build_model(path: Path, sizes: dict) -> dict:
    """The random Qwen2.5-0.5B-shaped model (or `sizes`), built on the GPU, saved in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from gantry.models.tiny import build_tokenizer

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    special = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    config = Qwen2Config(**sizes, **special, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.generation_config.pad_token_id = special["pad_token_id"]
    model.save_pretrained(path)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": parameters, "build_s": round(time.perf_counter() - started, 1)}


def read_metrics(output_dir: Path) -> list[dict]:
    """The step records of the newest run under `output_dir`."""
    found = sorted(output_dir.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        return []
    lines = found[-1].read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if "step" in r]


def median_of(records: list[dict], key: str) -> float | None:
    steady = records[SKIPPED_STEPS:] or records
    values = [r[key] for r in steady if isinstance(r.get(key), int | float)]
    return round(statistics.median(values), 6) if values else None


def summarise(records: list[dict], keys: list[str]) -> dict:
    figures = {f"{k}_median": median_of(records, k) for k in keys}
    figures["steps"] = len(records)
    return figures


SFT_KEYS = ["tokens_per_s", "policy_seconds", "tokens", "loss"]
GRPO_KEYS = [
    "samples_per_s",
    "completion_tokens_per_s",
    "policy_seconds",
    "generation_seconds",
    "weight_sync_s",
    "weight_sync_gbps",
    "logprob_gap_mean",
    "policy_idle_fraction",
    "reward_mean",
]


def run_training(name: str, runs: dict, work: Path, out: Path, keys: list[str]) -> dict:
    config, dataset, overrides = runs[name]
    result = run_logged(name, launcher_command(config, dataset, overrides), out, LIMITS_S[name])
    records = read_metrics(work / "outputs")
    result.update(summarise(records, keys))
    if name == "grpo" and records:
        gaps = [r["logprob_gap_mean"] for r in records if "logprob_gap_mean" in r]
        result["logprob_gap_max"] = max(gaps) if gaps else None
    return result


def device_facts() -> dict:
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
        facts["gpus"] = torch.cuda.device_count()
    return facts


def check(args: argparse.Namespace, runs: dict) -> int:
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    figures.update(device_facts())

    def save() -> None:  # after each phase: a later phase's timeout keeps the earlier figures
        (out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")

    figures["tests"] = {"exit": 0, "skipped_by": "--tiny"} if args.tiny else run_tests(out)
    save()
    figures["model"] = build_model(work / "qwen2.5-0.5b-random", TINY if args.tiny else QWEN25_05B)
    save()
    figures["sft"] = run_training("sft", runs, work / "sft", out, SFT_KEYS)
    save()
    figures["grpo"] = run_training("grpo", runs, work / "grpo", out, GRPO_KEYS)
    save()
    print(json.dumps(figures, indent=2))
    failed = [k for k in ("tests", "sft", "grpo") if figures[k]["exit"] != 0]
    failed += (
        ["tests"] if figures["tests"].get("failures") or figures["tests"].get("errors") else []
    )
    if failed:
        print(f"[gpu_check] failed: {', '.join(sorted(set(failed)))}: see {out}/<phase>.log")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check")
    )
    parser.add_argument("--work", default="/tmp/gantry-gpu-check")
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--grpo-steps", type=int, default=10)
    parser.add_argument("--plan", action="store_true", help="print what would run, then exit")
    parser.add_argument("--dry-run", action="store_true", help="--plan, and validate the configs")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, 4+3 steps, no tests")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sft_steps, args.grpo_steps = 4, 3
    work = Path(args.work)
    model = work / "qwen2.5-0.5b-random"
    runs = {
        name: run_overrides(model, work / name, args.sft_steps, args.grpo_steps, args.tiny)[name]
        for name in ("sft", "grpo")
    }
    if args.plan or args.dry_run:
        print("[gpu_check] on one GPU it would run:")
        print_plan(runs)
        if args.dry_run:
            dry_run(runs)
        return 0
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return check(args, runs)


if __name__ == "__main__":
    sys.exit(main())
