"""gantry.data.media: images and videos of sample messages, loaded as Qwen-VL processors expect them."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from gantry.data.media import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    MediaError,
    Video,
    has_media,
    load_image,
    load_media,
    load_video,
    sample_indices,
)

SMALL = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _colour(second: int) -> tuple[int, int, int]:
    """The test video is red in its first second, blue after."""
    return RED if second < 1 else BLUE


def _write_video(path, *, seconds=3, rate=10, width=64, height=48, codec="libx264"):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(seconds * rate):
            array = np.full((height, width, 3), _colour(index // rate), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("media") / "clip.mp4")


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(path)
    return path


def _assert_qwen_size(height, width, source_hw, min_pixels, max_pixels):
    assert (height, width) == smart_resize(
        *source_hw, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
    )
    assert height % 28 == 0 and width % 28 == 0
    if source_hw[0] * source_hw[1] < min_pixels:  # scaled up to at least min_pixels
        assert height * width >= min_pixels
    else:  # rounded, or scaled down to at most max_pixels
        assert height * width <= max_pixels


# ---- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "limits"),
    [
        ((150, 100), {}),
        ((1000, 700), {"max_pixels": 28 * 28 * 64}),
        ((20, 30), {"min_pixels": 28 * 28 * 16}),
        ((64, 48), SMALL),
    ],
)
def test_image_sides_are_multiples_of_28_within_limits(tmp_path, size, limits):
    path = tmp_path / "image.png"
    Image.new("RGB", size, RED).save(path)
    image = load_image(path, **limits)
    assert image.mode == "RGB"
    min_pixels = limits.get("min_pixels", IMAGE_MIN_PIXELS)
    max_pixels = limits.get("max_pixels", IMAGE_MAX_PIXELS)
    _assert_qwen_size(image.height, image.width, size[::-1], min_pixels, max_pixels)
    assert np.asarray(image)[image.height // 2, image.width // 2].tolist() == list(RED)


def test_image_of_the_right_size_keeps_its_pixels(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "exact.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "exact.png")), array)


def test_image_modes_become_rgb_with_white_for_transparency(tmp_path):
    rgba = Image.new("RGBA", (56, 56), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    Image.new("L", (56, 56), 128).save(tmp_path / "grey.png")
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(tmp_path / "grey.png"))[0, 0].tolist() == [128, 128, 128]


def test_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(MediaError, match="missing.png: no such file"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    with pytest.raises(MediaError, match=re.escape(f"{corrupt}: cannot read it")):
        load_image(corrupt)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1000, 4)).save(thin)
    with pytest.raises(MediaError, match=re.escape(f"{thin}: absolute aspect ratio")):
        load_image(thin)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        load_image(corrupt.with_name("x.png"), min_pixels=10_000, max_pixels=100)


# ---- videos ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "frames"),
    [
        ({"fps": 2.0}, 6),  # 3 s x 2 fps
        ({"fps": 1.0}, 4),  # 3 frames, raised to min_frames
        ({"fps": 3.0}, 10),  # 9 frames, the last repeated to make T even
        ({"fps": 2.0, "max_frames": 4}, 4),
        ({"fps": 2.0, "max_frames": 5}, 4),  # an odd cap is lowered, not passed by the padding
        ({"fps": 100.0}, 30),  # never more than the source holds
    ],
)
def test_video_frame_counts(video_path, kwargs, frames):
    video = load_video(video_path, **kwargs, **SMALL)
    assert video.frames.shape == (frames, 56, 56, 3)
    assert video.frames.dtype == np.uint8
    assert video.num_frames % 2 == 0
    assert video.source_fps == 10.0
    assert video.duration == 3.0


def test_video_sampling_is_uniform_and_keeps_colours(video_path):
    assert sample_indices(30, 10.0, fps=2.0, min_frames=4, max_frames=768) == [
        0,
        6,
        12,
        17,
        23,
        29,
    ]
    video = load_video(video_path, fps=2.0, **SMALL)
    assert video.fps == 2.0
    centre = video.frames[:, 28, 28].astype(int)
    expected = np.array([RED, RED, BLUE, BLUE, BLUE, BLUE])  # frames 0, 6 | 12, 17, 23, 29
    assert np.abs(centre - expected).max() < 16


def test_video_frames_are_resized_with_smart_resize(tmp_path):
    path = _write_video(tmp_path / "wide.mp4", seconds=1, width=320, height=180, codec="mpeg4")
    video = load_video(path, max_pixels=28 * 28 * 30)
    height, width = video.frames.shape[1:3]
    # the default minimum (128 patches) is lowered to the given maximum
    _assert_qwen_size(height, width, (180, 320), 28 * 28 * 30, 28 * 28 * 30)
    assert (height, width) == (112, 196)
    video = load_video(path, min_pixels=28 * 28 * 1000)  # and the default maximum raised
    _assert_qwen_size(*video.frames.shape[1:3], (180, 320), 28 * 28 * 1000, 28 * 28 * 1000)


def test_video_metadata_for_vllm_and_transformers(video_path):
    video = load_video(video_path, fps=3.0, **SMALL)
    assert video.vllm_metadata() == {
        "total_num_frames": 10,
        "fps": 3.0,
        "duration": 10 / 3.0,
        "frames_indices": list(range(10)),
        "do_sample_frames": False,
        "video_backend": "gantry",
    }
    meta = video.hf_metadata()
    assert "do_sample_frames" not in meta
    assert (meta["height"], meta["width"], meta["total_num_frames"]) == (56, 56, 10)


def test_gif_is_a_video(tmp_path):
    frames = [Image.new("RGB", (64, 48), RED if i % 2 else BLUE) for i in range(6)]
    path = tmp_path / "blink.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    video = load_video(path, fps=2.0, **SMALL)
    # 0.6 s at 2 fps is 1 frame, raised to min_frames 4: source frames 0, 2, 3, 5
    assert video.frames.shape == (4, 56, 56, 3)
    assert video.frames[:, 0, 0].tolist() == [list(BLUE), list(BLUE), list(RED), list(RED)]
    assert video.duration == pytest.approx(0.6)


def test_folder_of_frames_is_a_video_at_the_given_fps(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(5):
        Image.new("RGB", (64, 48), (index * 50, 0, 0)).save(folder / f"{index:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    video = load_video(folder, fps=2.0, **SMALL)
    assert video.frames.shape == (6, 56, 56, 3)  # 5 frames, the last repeated
    assert video.frames[:, 0, 0, 0].tolist() == [0, 50, 100, 150, 200, 200]
    assert (video.fps, video.source_fps, video.duration) == (2.0, 2.0, 2.5)
    assert video.vllm_metadata()["duration"] == 3.0


def test_video_errors_name_the_file(tmp_path):
    with pytest.raises(MediaError, match="gone.mp4: no such file"):
        load_video(tmp_path / "gone.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MediaError, match=re.escape(f"video {corrupt}")):
        load_video(corrupt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="folder holds no frame images"):
        load_video(empty)
    with pytest.raises(ValueError, match="fps must be positive"):
        load_video(empty, fps=0)


# ---- messages --------------------------------------------------------------------------------


def _messages(image_path, video_path):
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(video_path), "fps": 1.0, **SMALL},
                {"type": "text", "text": "what is 1 + 1"},
                {"type": "image", "image": str(image_path), "max_pixels": 28 * 28 * 16},
            ],
        },
        {"role": "assistant", "content": [{"type": "image", "image": f"file://{image_path}"}]},
    ]


def test_load_media_in_order_with_placeholders(image_path, video_path):
    messages = _messages(image_path, video_path)
    original = copy.deepcopy(messages)
    media = load_media(messages)
    assert messages == original
    assert [image.size for image in media.images] == [(112, 84), (140, 112)]
    assert [video.num_frames for video in media.videos] == [4]
    assert media.placeholder_messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "video"},
                {"type": "text", "text": "what is 1 + 1"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "image"}]},
    ]


def test_has_media_and_text_only_messages(image_path):
    text_only = [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
    ]
    assert not has_media(text_only)
    assert load_media(text_only).images == [] and load_media(text_only).processor_kwargs() == {}
    assert has_media([{"role": "user", "content": [{"type": "image", "image": str(image_path)}]}])


def test_load_media_errors_name_the_part_or_file(tmp_path):
    with pytest.raises(MediaError, match="needs a path in its 'image' key"):
        load_media([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(MediaError, match=r"unknown keys \['total_pixels'\]"):
        part = {"type": "video", "video": "v.mp4", "total_pixels": 280}
        load_media([{"role": "user", "content": [part]}])
    with pytest.raises(MediaError, match="nothing.png"):
        load_media(
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": str(tmp_path / "nothing.png")}],
                }
            ]
        )


def test_vllm_multi_modal_data(image_path, video_path):
    media = load_media(_messages(image_path, video_path))
    data = media.vllm_multi_modal_data()
    assert data["image"] == media.images
    ((frames, meta),) = data["video"]
    assert frames is media.videos[0].frames and meta["do_sample_frames"] is False


# ---- the tiny VLM's processor and model accept them ------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from gantry.models.tiny import build_tiny_vlm

    path = build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)


def test_processor_and_model_accept_loaded_media(tiny_vlm, image_path, video_path):
    import torch

    processor, model = tiny_vlm
    media = load_media(_messages(image_path, video_path))
    text = processor.apply_chat_template(media.placeholder_messages, tokenize=False)
    kwargs = media.processor_kwargs()
    batch = processor(text=[text], **kwargs, return_tensors="pt")
    # images: 84x112 and 112x140 pixels in 14x14 patches; video: 4 frames of 56x56, 2 per patch
    assert batch["image_grid_thw"].tolist() == [[1, 6, 8], [1, 8, 10]]
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert batch["pixel_values"].shape == (48 + 80, 3 * 2 * 14 * 14)
    assert batch["pixel_values_videos"].shape == (32, 3 * 2 * 14 * 14)
    assert batch["second_per_grid_ts"].tolist() == [2 / media.videos[0].fps]
    ids = batch["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == (48 + 80) // 4
    assert int((ids == model.config.video_token_id).sum()) == 32 // 4
    # the processor's own resize leaves our pixels alone
    unresized = processor(text=[text], **kwargs, do_resize=False, return_tensors="pt")
    assert torch.equal(batch["pixel_values"], unresized["pixel_values"])
    assert torch.equal(batch["pixel_values_videos"], unresized["pixel_values_videos"])
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)


def test_video_dataclass_is_plain():
    video = Video(frames=np.zeros((2, 28, 28, 3), np.uint8), fps=1.0, source_fps=1.0, duration=2.0)
    assert video.vllm_metadata()["duration"] == 2.0
