"""Load the images and videos that Gantry's sample messages point at, ready for Qwen-VL models.

A sample's `messages` are chat messages whose content is a string or a list of parts:
`{"type": "text", "text": ...}`, `{"type": "image", "image": "/abs/path", "min_pixels"?,
"max_pixels"?, "resized_height"?, "resized_width"?}` and `{"type": "video", "video": "/abs/path"
(a file, or a folder of frame images), "fps"?, "min_frames"?, "max_frames"?, "min_pixels"?,
"max_pixels"?, "resized_height"?, "resized_width"?}`. `resized_height` and `resized_width`
(both or neither, as in qwen-vl-utils) ask for that size, rounded by `smart_resize`.

Media are resized here, once, with Qwen2-VL's `smart_resize` (sides multiples of 28, pixels
within limits). The processor's own resize is then the identity, so the policy (a transformers
processor) and the rollout (vLLM) see the same pixels. Videos are decoded with PyAV and sampled
here too: give them to a processor with `do_sample_frames=False` and the metadata below.

    media = load_media(messages)
    text = processor.apply_chat_template(media.placeholder_messages, tokenize=False)
    batch = processor(text=[text], **media.processor_kwargs(), return_tensors="pt")
    prompt = {"prompt": text, "multi_modal_data": media.vllm_multi_modal_data()}  # vLLM
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# Qwen2-VL / Qwen2.5-VL defaults (qwen-vl-utils): 28 = patch 14 x spatial merge 2.
FACTOR = 28
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 16384 * 28 * 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class MediaError(ValueError):
    """A media file is missing, unreadable or empty; the message names the file."""


@dataclass
class Video:
    """Sampled, resized frames of one video.

    frames: [T, H, W, 3] uint8 RGB, T even (Qwen's temporal patch is 2 frames).
    fps: the rate of the sampled frames; source_fps and duration (seconds) describe the source.
    """

    frames: np.ndarray
    fps: float
    source_fps: float
    duration: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def vllm_metadata(self) -> dict:
        """Metadata for vLLM's `multi_modal_data={"video": [(frames, metadata)]}`."""
        return {
            "total_num_frames": self.num_frames,
            "fps": self.fps,
            "duration": self.num_frames / self.fps,
            "frames_indices": list(range(self.num_frames)),
            "do_sample_frames": False,
            "video_backend": "gantry",
        }

    def hf_metadata(self) -> dict:
        """Metadata for a transformers processor's `video_metadata=[...]` (its allowed keys)."""
        meta = self.vllm_metadata()
        del meta["do_sample_frames"]
        height, width = self.frames.shape[1:3]
        return {**meta, "height": int(height), "width": int(width)}


@dataclass
class LoadedMedia:
    """The media of a sample, in order of appearance, and the messages a chat template needs."""

    images: list[Image.Image] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    placeholder_messages: list[dict] = field(default_factory=list)

    def processor_kwargs(self) -> dict:
        """Keyword arguments for a Qwen2(.5)-VL transformers processor call (besides `text`)."""
        kwargs: dict[str, Any] = {}
        if self.images:
            kwargs["images"] = self.images
        if self.videos:
            kwargs["videos"] = [video.frames for video in self.videos]
            kwargs["video_metadata"] = [video.hf_metadata() for video in self.videos]
            kwargs["do_sample_frames"] = False
        return kwargs

    def vllm_multi_modal_data(self) -> dict:
        """vLLM's `multi_modal_data` for one prompt: images, and (frames, metadata) videos."""
        data: dict[str, list] = {}
        if self.images:
            data["image"] = self.images
        if self.videos:
            data["video"] = [(video.frames, video.vllm_metadata()) for video in self.videos]
        return data


# ---- images ----------------------------------------------------------------------------------


def _local_path(path: str | Path) -> Path:
    text = str(path)
    return Path(text.removeprefix("file://"))


def target_size(
    height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = FACTOR
) -> tuple[int, int]:
    """(height, width) after Qwen2-VL's `smart_resize`: multiples of `factor`, pixels in limits."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _pixel_limits(min_pixels, max_pixels, default_min: int, default_max: int) -> dict:
    """{"min_pixels", "max_pixels"}: the given values, else defaults that fit the given one."""
    if min_pixels is None:
        min_pixels = default_min if max_pixels is None else min(default_min, int(max_pixels))
    if max_pixels is None:
        max_pixels = max(default_max, int(min_pixels))
    min_pixels, max_pixels = int(min_pixels), int(max_pixels)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    return {"min_pixels": min_pixels, "max_pixels": max_pixels}


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (as qwen-vl-utils does)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _resize_exact(image: Image.Image, height: int, width: int) -> Image.Image:
    """Bicubic resize to (height, width); the image itself when it has that size already."""
    from PIL import Image

    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


def _resize(image: Image.Image, **limits) -> Image.Image:
    return _resize_exact(image, *_frame_size(image.height, image.width, limits))


def _frame_size(height: int, width: int, limits: dict) -> tuple[int, int]:
    """`target_size` of (height, width), or of the asked (resized_height, resized_width)."""
    limits = dict(limits)
    asked = limits.pop("resized", None)
    return target_size(*(asked or (height, width)), **limits)


def _resized(resized_height: int | None, resized_width: int | None) -> tuple[int, int] | None:
    if (resized_height is None) != (resized_width is None):
        raise MediaError(
            f"give resized_height and resized_width together, got {resized_height} and "
            f"{resized_width}"
        )
    return None if resized_height is None else (int(resized_height), int(resized_width))


def _open_image(path: Path) -> Image.Image:
    from PIL import Image, ImageOps

    if not path.is_file():
        raise MediaError(f"image {path}: no such file")
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"image {path}: cannot read it ({exc})") from exc


def load_image(
    path: str | Path,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = FACTOR,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> Image.Image:
    """Open an image as RGB, resized so both sides are multiples of `factor`, pixels in limits
    (from resized_height x resized_width when given, else from its own size).

    With no limits, Qwen's defaults: 4 to 16384 patches of 28x28 pixels.
    """
    limits = _pixel_limits(min_pixels, max_pixels, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
    limits["resized"] = _resized(resized_height, resized_width)
    path = _local_path(path)
    image = _open_image(path)
    try:
        return _resize(image, **limits, factor=factor)
    except ValueError as exc:  # smart_resize: aspect ratio over 200
        raise MediaError(f"image {path}: {exc}") from exc


# ---- videos ----------------------------------------------------------------------------------


def sample_indices(
    total: int, source_fps: float, *, fps: float, min_frames: int, max_frames: int
) -> list[int]:
    """Indices of frames taken uniformly at `fps`: at least min_frames, at most max_frames.

    Never more than the `total` frames there are; first and last frames are always taken.
    """
    wanted = round(total / source_fps * fps)
    count = min(max(wanted, min_frames, 1), max_frames, total)
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    if frames.shape[0] % 2 == 0:
        return frames
    return np.concatenate([frames, frames[-1:]], axis=0)


def _check_video_args(fps: float, min_frames: int, max_frames: int) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 1 <= min_frames <= max_frames or max_frames < 2:
        raise ValueError(
            f"need 1 <= min_frames <= max_frames and max_frames >= 2, got "
            f"min_frames={min_frames}, max_frames={max_frames}"
        )


def _stream_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(Fraction(rate))
    return None


def _count_frames(path: Path, stream) -> int:
    """Frames in the stream: from the header, else by counting packets (no decoding)."""
    import av

    if stream.frames:
        return int(stream.frames)
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def _decode_selected(container, indices: list[int], size: tuple[int, int]) -> list[np.ndarray]:
    """Decode the first video stream up to the last index; the frames at `indices`, resized.

    A stream may hold fewer frames than its header says: the last decoded frame stands in.
    """
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    wanted, kept, frame = set(indices), {}, None
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            kept[index] = _frame_array(frame, size)
        if index >= indices[-1]:
            break
    if frame is None:
        return []
    last = kept[index] if index in kept else _frame_array(frame, size)
    return [kept.get(i, last) for i in indices]


def _frame_array(frame, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(_resize_exact(frame.to_image().convert("RGB"), *size))


def _read_video_file(path: Path, sampling: dict, limits: dict) -> tuple[np.ndarray, float, int]:
    """(frames [n, H, W, 3], source fps, total frames) of a video file, sampled and resized."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"video {path}: has no video stream")
            stream = container.streams.video[0]
            total = _count_frames(path, stream)
            if total == 0:
                raise MediaError(f"video {path}: has no frames")
            source_fps = _stream_fps(stream) or sampling["fps"]
            indices = sample_indices(total, source_fps, **sampling)
            size = _frame_size(stream.height, stream.width, limits)
            frames = _decode_selected(container, indices, size)
    except MediaError:
        raise
    except av.FFmpegError as exc:
        raise MediaError(f"video {path}: cannot decode it ({exc})") from exc
    except ValueError as exc:  # smart_resize: aspect ratio over 200
        raise MediaError(f"video {path}: {exc}") from exc
    if not frames:
        raise MediaError(f"video {path}: no frame could be decoded")
    return np.stack(frames), source_fps, total


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def _read_frame_folder(path: Path, sampling: dict, limits: dict) -> tuple[np.ndarray, float, int]:
    """(frames, source fps, total frames) of a folder of frame images (sorted by name) at `fps`."""
    files = _frame_files(path)
    if not files:
        raise MediaError(f"video {path}: folder holds no frame images ({sorted(FRAME_SUFFIXES)})")
    source_fps = sampling["fps"]
    indices = sample_indices(len(files), source_fps, **sampling)
    images = [_open_image(files[i]) for i in indices]
    try:
        height, width = _frame_size(images[0].height, images[0].width, limits)
    except ValueError as exc:  # smart_resize: aspect ratio over 200
        raise MediaError(f"video {path}: {exc}") from exc
    frames = [np.asarray(_resize_exact(image, height, width)) for image in images]
    return np.stack(frames), source_fps, len(files)


def load_video(
    path: str | Path,
    *,
    fps: float = VIDEO_FPS,
    max_frames: int = VIDEO_MAX_FRAMES,
    min_frames: int = VIDEO_MIN_FRAMES,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = FACTOR,
    resized_height: int | None = None,
    resized_width: int | None = None,
) -> Video:
    """Decode a video file (or a folder of frame images at `fps`), sampled and resized.

    Frames are taken uniformly at `fps` (at least min_frames, at most max_frames, never more than
    the source has); the last is repeated if their count is odd. Every frame is resized with
    `smart_resize` (of resized_height x resized_width when given); with no limits, Qwen's video
    defaults: 128 to 768 patches of 28x28 pixels.
    """
    _check_video_args(fps, min_frames, max_frames)
    path = _local_path(path)
    sampling = {"fps": fps, "min_frames": min_frames, "max_frames": max_frames - max_frames % 2}
    limits = _pixel_limits(min_pixels, max_pixels, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    limits["factor"] = factor
    limits["resized"] = _resized(resized_height, resized_width)
    if path.is_dir():
        frames, source_fps, total = _read_frame_folder(path, sampling, limits)
    elif path.is_file():
        frames, source_fps, total = _read_video_file(path, sampling, limits)
    else:
        raise MediaError(f"video {path}: no such file or folder")
    duration = total / source_fps
    return Video(
        frames=_pad_to_even(frames),
        fps=len(frames) / duration,
        source_fps=source_fps,
        duration=duration,
    )


# ---- messages --------------------------------------------------------------------------------

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "max_frames", "min_frames", *IMAGE_OPTIONS)


def _media_parts(messages: list[dict]):
    """Every image/video part, in order of appearance."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for part in content:
            if part.get("type") in ("image", "video"):
                yield part


def has_media(messages: list[dict]) -> bool:
    """True when some message has an image or video part."""
    return next(_media_parts(messages), None) is not None


def _source(part: dict) -> str:
    kind = part["type"]
    source = part.get(kind)
    if not isinstance(source, (str, Path)) or not str(source):
        raise MediaError(f"{kind} part {part!r} needs a path in its {kind!r} key")
    return str(source)


def _load_part(part: dict):
    options = IMAGE_OPTIONS if part["type"] == "image" else VIDEO_OPTIONS
    unknown = sorted(set(part) - {"type", part["type"], *options})
    if unknown:
        raise MediaError(
            f"{part['type']} part {part!r} has unknown keys {unknown}; "
            f"known: {sorted(['type', part['type'], *options])}"
        )
    kwargs = {key: part[key] for key in options if part.get(key) is not None}
    if part["type"] == "image":
        return load_image(_source(part), **kwargs)
    return load_video(_source(part), **kwargs)


def placeholder_messages(messages: list[dict]) -> list[dict]:
    """A deep copy of `messages` with each image/video part reduced to {"type": ...}."""
    out = copy.deepcopy(messages)
    for message in out:
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [
                {"type": p["type"]} if p.get("type") in ("image", "video") else p for p in content
            ]
    return out


def load_media(messages: list[dict]) -> LoadedMedia:
    """Load every image and video the messages point at; raises MediaError naming a bad file."""
    media = LoadedMedia(placeholder_messages=placeholder_messages(messages))
    for part in _media_parts(messages):
        loaded = _load_part(part)
        (media.images if part["type"] == "image" else media.videos).append(loaded)
    return media
