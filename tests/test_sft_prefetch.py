"""Encoding SFT steps ahead in encoder processes: the micro-batches equal the inline ones (text
and images), a sample's error reaches the training process with its name, a share nobody
announced is encoded inline, unpicklable samples are refused with the fix, and a torch Dataset
of the dataset script's own class reaches the encoder processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from gantry.data.plugin import load_dataset_script
from policy.sft_prefetch import EncoderSpec, StepEncoder, _pickled, by_path_modules
from tests.distributed_helpers import ROOT


def chat(question: str, answer: str, content=None) -> dict:
    user = {"role": "user", "content": content or question}
    return {"messages": [user, {"role": "assistant", "content": answer}]}


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.attention_mask, y.attention_mask)
        assert torch.equal(x.targets, y.targets)
        assert torch.equal(x.label_positions, y.label_positions)
        assert x.vision.keys() == y.vision.keys()
        for key in x.vision:
            assert torch.equal(x.vision[key], y.vision[key])
        assert (x.tokens, x.assistant_tokens) == (y.tokens, y.assistant_tokens)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_workers_give_the_inline_micro_batches_for_text(tiny_llm):
    samples = [chat(f"what is {i} + {i}?", f"{2 * i}" + " and more" * (i % 4)) for i in range(12)]
    samples.append(chat("hi " * 80, "ok"))  # cut at max_length
    spec = EncoderSpec(str(tiny_llm), 64, False, mini_batch=3, pad_token_id=0)
    steps = StepEncoder(spec, samples, workers=2)
    try:
        share = [12, 3, 5, 7, 1, 0, 9]
        steps.prepare(share)
        assert steps.ahead is not None and len(steps.ahead[1]) == 2  # 3 micro-batches, 2 procs
        ahead, truncated = steps.take(share)
        inline, inline_truncated = steps.encode_inline(share)
        assert_same(ahead, inline)
        assert [b.input_ids.shape[0] for b in ahead] == [3, 3, 1]
        # Each worker's part is grouped by length: part one (6 samples) pads the least.
        lengths = [int(n) for b in ahead[:2] for n in b.attention_mask.sum(1)]
        assert lengths == sorted(lengths)
        assert truncated == inline_truncated == 1
        # A share other than the announced one is encoded inline, the announced one dropped.
        steps.prepare([1, 2])
        other, _ = steps.take([4, 5])
        assert_same(other, steps.inline.micro_batches([[4, 5]])[0])
        assert steps.ahead is None
    finally:
        steps.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_workers_give_the_inline_micro_batches_for_images(tiny_vlm, tmp_path):
    Image.new("RGB", (84, 56), (220, 20, 20)).save(tmp_path / "red.png")
    picture = {"type": "image", "image": str(tmp_path / "red.png"), "max_pixels": 3136}
    samples = [
        chat("", "red", [picture, {"type": "text", "text": "Colour?"}]),
        chat("Say hi", "hi there"),
    ]
    spec = EncoderSpec(str(tiny_vlm), 4096, True, mini_batch=2, pad_token_id=0)
    steps = StepEncoder(spec, samples, workers=1)
    try:
        steps.prepare([0, 1])
        ahead, _ = steps.take([0, 1])
        assert "pixel_values" in ahead[0].vision
        assert_same(ahead, steps.inline.micro_batches([[0, 1]])[0])
    finally:
        steps.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_bad_sample_fails_the_step_that_takes_it(tiny_llm):
    samples = [chat("q", "a"), {"id": "q7", "messages": [{"role": "user", "content": "hi"}]}]
    spec = EncoderSpec(str(tiny_llm), 64, False, mini_batch=2, pad_token_id=0)
    steps = StepEncoder(spec, samples, workers=1)
    try:
        steps.prepare([0, 1])
        with pytest.raises(ValueError, match=r"sample 1 \(id q7\): no assistant turn"):
            steps.take([0, 1])
    finally:
        steps.close()


TORCH_DATASET_SCRIPT = """
import torch.utils.data


class Conversations(torch.utils.data.Dataset):
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        user = {"role": "user", "content": f"what is {index} + {index}?"}
        return {"messages": [user, {"role": "assistant", "content": str(2 * index)}]}


def get_dataset(config):
    return Conversations(config.get("size", 6))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_torch_dataset_of_the_script_reaches_the_encoder_processes(tiny_llm, tmp_path):
    """The script is imported as gantry_dataset_script, a name spawned processes cannot import:
    they are told its file and import it when unpickling the dataset asks for it."""
    path = tmp_path / "torch_data.py"
    path.write_text(TORCH_DATASET_SCRIPT)
    samples = load_dataset_script(path, need_rewards=False).load_samples({"size": 6})
    assert type(samples).__module__ == "gantry_dataset_script"
    assert by_path_modules()["gantry_dataset_script"] == str(path.resolve())
    spec = EncoderSpec(str(tiny_llm), 64, False, mini_batch=2, pad_token_id=0)
    steps = StepEncoder(spec, samples, workers=1)
    try:
        share = [5, 0, 3, 1]
        steps.prepare(share)
        ahead, _ = steps.take(share)
        assert_same(ahead, steps.encode_inline(share)[0])
    finally:
        steps.close()


def test_unpicklable_samples_are_refused_with_the_fix(tiny_llm):
    samples = [{"messages": [], "lock": threading.Lock()}]
    spec = EncoderSpec(str(tiny_llm), 64, False, mini_batch=1, pad_token_id=0)
    with pytest.raises(TypeError, match="dataloader_num_workers = 0"):
        StepEncoder(spec, samples, workers=1)


def test_samples_holding_functions_are_refused_with_the_fix():
    def local_scorer():  # a local function: pickle raises AttributeError
        return 0.0

    for held in (local_scorer, lambda: 0.0):  # a lambda: pickle raises PicklingError
        with pytest.raises(TypeError, match="dataloader_num_workers = 0"):
            _pickled([{"messages": [], "score": held}])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_encoder_processes_exit_when_the_training_process_is_killed(tiny_llm, tmp_path):
    """SIGKILL of the training process (no shutdown) must not leave its encoders behind."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from policy.sft_prefetch import EncoderSpec, StepEncoder\n"
        "if __name__ == '__main__':\n"
        "    spec = EncoderSpec(sys.argv[1], 64, False, mini_batch=1, pad_token_id=0)\n"
        "    steps = StepEncoder(spec, [{'messages': []}], workers=2)\n"
        "    steps.pool.submit(int).result()\n"
        "    print(' '.join(map(str, steps.pool._processes)), flush=True)\n"
        "    time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, str(script), str(tiny_llm)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
