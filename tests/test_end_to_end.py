"""End to end: the launcher runs the quickstart; the run finishes, the reward rises, and the
exported checkpoint loads with transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", "configs/quickstart-grpo.toml", "datasets/arithmetic.py"]


def run_launcher(tmp_path, *overrides, timeout):
    result = subprocess.run(
        [sys.executable, "-m", "gantry.launch", *QUICKSTART, f"train.output_dir={tmp_path}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    return result, run_dir, json.loads((run_dir / "result.json").read_text())


def check_export(path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(ids, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_with_transformers_engine(tmp_path):
    """The whole process topology, quickly: controller, two policy replicas (two torchrun
    agents forming one data-parallel job), rollout (transformers engine)."""
    result, run_dir, outcome = run_launcher(
        tmp_path, "rollout.backend=transformers", "train.max_num_steps=4",
        "policy.parallelism.n_init_replicas=2", "train.train_batch_per_replica=64", timeout=280,
    )  # fmt: skip
    assert "policy replica 1 registered" in result.stdout
    assert outcome["steps"] == 4 and outcome["duplicates"] == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    config = json.loads((run_dir / "config.json").read_text())
    bound = config["train"]["train_policy"]["allowed_outdated_steps"]
    assert all(m["staleness_max"] <= bound for m in metrics)
    # The control plane's own cost (gantry.comm.metrics): every step measures it.
    assert all(
        0 <= m["control_latency_p50_ms"] <= m["control_latency_p99_ms"]
        and m["controller_cpu_s"] > 0
        for m in metrics
    )
    assert any(m["sync_order_latency_ms"] > 0 for m in metrics[1:])  # syncs were taken
    assert "step 4/4" in result.stdout and "exported checkpoint" in result.stdout
    for role in ("controller", "policy0", "policy1", "rollout0"):
        assert (run_dir / "logs" / f"{role}.log").exists()
    check_export(outcome["final_export"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_with_vllm_reward_rises(tmp_path):
    """The README's main command as is (vLLM engine): the reward of the last 10 steps is at
    least twice that of the first 10."""
    result, run_dir, outcome = run_launcher(tmp_path, timeout=880)
    assert outcome["reward_mean_last_10"] >= 2 * outcome["reward_mean_first_10"], outcome
    assert outcome["reward_mean_last_10"] > 0.2, outcome
    check_export(outcome["final_export"])


# A rollout replica started by hand: `python -m rollout --run-dir RUN --replica 2`, with its
# imports done before it is told the run directory.
JOINER = """
import sys, runpy
import rollout.worker  # torch, transformers, the engines
sys.argv = ["rollout", "--run-dir", sys.stdin.readline().strip(), "--replica", "2"]
runpy.run_module("rollout", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_rollout_replicas_and_a_late_joiner(tmp_path):
    """Two rollout replicas share the prompts; a third started by hand mid-run gets the
    current weights before its first prompt and then takes its share."""
    args = [
        sys.executable, "-m", "gantry.launch", *QUICKSTART, f"train.output_dir={tmp_path}",
        "rollout.backend=transformers", "rollout.parallelism.n_init_replicas=2",
        "train.train_batch_per_replica=64", "rollout.batch_size=2", "train.max_num_steps=64",
    ]  # fmt: skip
    # The joiner imports torch, transformers and the rollout worker before the run starts, then
    # waits for the run directory on its stdin: it joins soon after the first weight sync. The
    # run is long enough (64 steps: ~0.6 s each here) for a joiner slowed by a loaded machine.
    joiner = subprocess.Popen(
        [sys.executable, "-c", JOINER], cwd=ROOT, stdin=subprocess.PIPE, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    launcher = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines, joined = [], False
        for line in launcher.stdout:
            lines.append(line)
            if not joined and "sent weights v1 " in line:  # the run is past version 0
                run_dir = next(
                    ln.split(": ", 1)[1].strip() for ln in lines if ln.startswith("run directory")
                )
                joiner.stdin.write(run_dir + "\n")
                joiner.stdin.close()
                joined = True
        assert launcher.wait(timeout=60) == 0, "".join(lines[-80:])
        assert joined and joiner.wait(timeout=60) == 0
    finally:
        for process in (launcher, joiner):
            process.kill()
    outcome = json.loads((Path(run_dir) / "result.json").read_text())
    replicas = outcome["rollout_replicas"]
    assert sorted(replicas) == ["0", "1", "2"]
    late = replicas["2"]
    assert late["joined_at_version"] >= 1 and late["syncs"] >= 1 and late["groups"] > 0
    # Its first results were generated with the weights it was sent, never the initial ones.
    assert late["min_result_version"] >= late["joined_at_version"]
    assert replicas["0"]["groups"] > 0 and replicas["1"]["groups"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_two_tensor_parallel_replicas(tmp_path):
    """Two vLLM replicas of two TP worker processes each (CPU build): both generate, every
    sync reaches all four ranks, staleness stays within the bound."""
    result, run_dir, outcome = run_launcher(
        tmp_path, "rollout.parallelism.tp_size=2", "rollout.parallelism.n_init_replicas=2",
        "train.max_num_steps=6", timeout=580,
    )  # fmt: skip
    replicas = outcome["rollout_replicas"]
    assert {r: s["ranks"] for r, s in replicas.items()} == {"0": 2, "1": 2}
    assert all(s["groups"] > 0 and s["syncs"] >= 5 for s in replicas.values()), replicas
    assert "to 4 rollout ranks" in result.stdout
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m["staleness_max"] for m in metrics) <= 1
    check_export(outcome["final_export"])
