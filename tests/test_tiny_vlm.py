"""The built-in tiny Qwen2.5-VL: built locally, reloaded through the Auto classes, trainable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gantry.models.tiny import (
    BUILTIN_MODELS,
    MARKER,
    build_tiny_vlm,
    ensure_tiny_model,
    ensure_tiny_vlm,
)

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is 1 + 1"}]},
    {"role": "assistant", "content": "2"},
]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="module")
def loaded(vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(vlm_dir), AutoModelForImageTextToText.from_pretrained(
        vlm_dir
    )


def _image(width: int = 84, height: int = 56) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_reloads_with_auto_classes(loaded):
    processor, model = loaded
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.dtype == torch.float32
    tokenizer = processor.tokenizer
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chat_template_places_vision_tokens(loaded):
    processor, _ = loaded
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is 1 + 1<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
    )


def test_forward_with_image_gives_finite_loss(loaded):
    processor, model = loaded
    text = processor.apply_chat_template(MESSAGES, tokenize=False)
    batch = processor(text=[text], images=[_image()], return_tensors="pt")
    assert {"pixel_values", "image_grid_thw"} <= set(batch)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]  # 56x84 pixels in 14x14 patches
    image_id = model.config.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == 4 * 6 // 4  # merged 2x2
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.visual.patch_embed.proj.weight.grad is not None


def test_ensure_reuses_and_rebuilds_on_recipe_change(tmp_path):
    path = ensure_tiny_model(tmp_path / "m", kind="qwen2.5-vl")
    marker = json.loads((path / MARKER).read_text())
    assert marker["kind"] == "qwen2.5-vl"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_vlm(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    (path / MARKER).write_text(json.dumps({**marker, "recipe_version": -1}))
    ensure_tiny_vlm(path)
    assert json.loads((path / MARKER).read_text()) == marker


def test_builtin_names_map_to_builders():
    assert BUILTIN_MODELS["gantry:tiny-qwen2"] is ensure_tiny_model
    assert BUILTIN_MODELS["gantry:tiny-qwen2.5-vl"] is ensure_tiny_vlm
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        ensure_tiny_model("unused", kind="llama")


VLLM_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from gantry.data.media import load_media
path, messages = sys.argv[1], json.loads(sys.argv[2])
media = load_media(messages)
from transformers import AutoProcessor
text = AutoProcessor.from_pretrained(path).apply_chat_template(
    media.placeholder_messages, tokenize=False, add_generation_prompt=True)
llm = LLM(path, enforce_eager=True, max_model_len=1024, dtype="float32",
          kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"image": 1, "video": 1})
prompt = {"prompt": text, "multi_modal_data": media.vllm_multi_modal_data()}
out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
print("RESULT", json.dumps([list(out.prompt_token_ids), list(out.outputs[0].token_ids)]))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_runs_it_like_transformers(vlm_dir, loaded, tmp_path):
    """vLLM's CPU build takes the image and the (frames, metadata) video of gantry.data.media and
    gives the same prompt ids and greedy tokens as transformers."""
    pytest.importorskip("vllm")
    import subprocess
    import sys

    import av

    from gantry.data.media import load_media

    Image.fromarray(np.asarray(_image(150, 100))).save(tmp_path / "image.png")
    with av.open(str(tmp_path / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(20):
            array = np.full((48, 64, 3), index * 10, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    small = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(tmp_path / "image.png"), **small},
                {"type": "video", "video": str(tmp_path / "clip.mp4"), **small},
                {"type": "text", "text": "what is 1 + 1"},
            ],
        }
    ]
    run = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(vlm_dir), json.dumps(messages)],
        capture_output=True,
        text=True,
        timeout=550,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    prompt_ids, vllm_tokens = json.loads(result.removeprefix("RESULT "))

    processor, model = loaded
    media = load_media(messages)
    text = processor.apply_chat_template(
        media.placeholder_messages, tokenize=False, add_generation_prompt=True
    )
    batch = processor(text=[text], **media.processor_kwargs(), return_tensors="pt")
    assert batch["input_ids"][0].tolist() == prompt_ids
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert generated[0, len(prompt_ids) :].tolist() == vllm_tokens
