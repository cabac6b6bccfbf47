"""GRPO on a vision-language model: vLLM's CPU build generates from prompts with images, the
policy encodes the same images again and recomputes the samplers' log-probs exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.distributed_helpers import ROOT

COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "black": (0, 0, 0)}


def write_colour_questions(root, count: int = 16):
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(count):
        name = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (56 + 28 * (i % 2), 56), COLOURS[name]).save(root / "images" / f"{i}.png")
        conversation = [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": name},
        ]
        entries.append({"id": f"q{i}", "image": f"images/{i}.png", "conversations": conversation})
    (root / "train.json").write_text(json.dumps(entries))
    return root / "train.json"


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_grpo_on_a_vlm_with_vllm_multimodal_prompts(tmp_path):
    annotations = write_colour_questions(tmp_path / "data")
    out = tmp_path / "outputs"
    cmd = [
        sys.executable, "-m", "gantry.launch", str(ROOT / "datasets" / "llava_json.py"),
        'policy.model_name_or_path="gantry:tiny-qwen2.5-vl"', "policy.model_max_length=512",
        "rollout.n_generation=4", "train.train_batch_per_replica=16", "rollout.batch_size=4",
        "rollout.max_response_length=6", "train.max_num_steps=3", 'train.param_dtype="float32"',
        "train.optm_lr=1e-3", f'train.output_dir="{out}"', "logging.log_interval=1",
        f'custom.dataset.annotation_path="{annotations}"', "custom.vision.max_pixels=3136",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=560)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.name != ".models"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    first = metrics[0]
    # Step 1 trains on samples of the initial weights: the policy's log-probs of the completions,
    # given the same pixels and M-RoPE positions, equal vLLM's: positioning the image tokens as
    # text alone (log-probs off by ~4e-3 here) gives a KL of ~1e-5.
    assert first["staleness_max"] == 0
    assert first["kl_behaviour"] < 1e-8, first
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["steps"] == 3 and summary["final_export"]
