"""Vision inputs of the policy's forward passes (Qwen-VL): per-row processor tensors merged into
micro-batches, the prompts of GRPO rollouts encoded again, and the blank fillers FSDP needs.

FSDP2 gathers each vision block when it runs, so every rank must run the vision tower as many
times, in the same order (images, then videos), in every micro-batch. A micro-batch without
images (or videos) gets a blank one in a row of its own: one merged patch, no trained token, so
its gradients are zero (`vision_fillers`). A single rank needs none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gantry.data.media import load_media

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
# The processor output whose presence says a row has images / videos.
MEDIA_KINDS = ("pixel_values", "pixel_values_videos")


@dataclass
class VisionInputs:
    """A row's processor outputs: pixel patches and grids, seconds per temporal patch."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    second_per_grid_ts: list[float] = field(default_factory=list)  # one per video

    @classmethod
    def of(cls, outputs) -> VisionInputs:
        seconds = outputs.get("second_per_grid_ts")
        return cls(
            {key: outputs[key] for key in VISION_KEYS if key in outputs},
            [float(s) for s in seconds] if seconds is not None else [],
        )


def merge_vision(rows: list[VisionInputs], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for a micro-batch whose rows hold `rows`, in row order."""
    merged: dict[str, torch.Tensor] = {}
    for key in VISION_KEYS:
        parts = [r.tensors[key] for r in rows if key in r.tensors]
        if parts:
            merged[key] = torch.cat(parts).to(device)
    seconds = [s for r in rows for s in r.second_per_grid_ts]
    if seconds:
        merged["second_per_grid_ts"] = torch.tensor(seconds, device=device)
    return merged


def token_types(input_ids: torch.Tensor, config) -> torch.Tensor:
    """Qwen-VL's `mm_token_type_ids` for a batch (1: image patch, 2: video patch, 0: text).

    With them transformers builds the 3-D (M-RoPE) positions of the patches, as the processor's
    own output and vLLM do; without them every token is positioned as text."""
    types = (input_ids == config.image_token_id).int()
    return types + 2 * (input_ids == config.video_token_id).int()


def vision_fillers(model) -> dict[str, tuple[list[int], VisionInputs]]:
    """A blank image and a blank video for a Qwen-VL model: (token ids, vision inputs), keyed
    by the media kind they stand in for."""
    config = model.config
    conv = model.model.visual.patch_embed.proj
    patch_dim = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2]
    merge = config.vision_config.spatial_merge_size
    grid = torch.tensor([[1, merge, merge]])  # merge x merge patches: one token
    pixels = torch.zeros(merge * merge, patch_dim)

    def ids(pad_id: int) -> list[int]:
        return [config.vision_start_token_id, pad_id, config.vision_end_token_id]

    return {
        "pixel_values": (
            ids(config.image_token_id),
            VisionInputs({"pixel_values": pixels, "image_grid_thw": grid}),
        ),
        "pixel_values_videos": (
            ids(config.video_token_id),
            VisionInputs({"pixel_values_videos": pixels, "video_grid_thw": grid}, [1.0]),
        ),
    }


def missing_kinds(rows: list[VisionInputs]) -> list[str]:
    """The media kinds no row of a micro-batch has."""
    return [kind for kind in MEDIA_KINDS if not any(kind in r.tensors for r in rows)]


class PromptVision:
    """A GRPO prompt's media encoded again on the policy side, as the rollout engine saw them."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)

    def encode(self, messages: list[dict]) -> tuple[list[int], VisionInputs]:
        """The prompt's ids (placeholders expanded) and its vision inputs."""
        media = load_media(messages)
        text = self.processor.apply_chat_template(
            media.placeholder_messages, add_generation_prompt=True, tokenize=False
        )
        outputs = self.processor(text=[text], **media.processor_kwargs(), return_tensors="pt")
        return outputs["input_ids"][0].tolist(), VisionInputs.of(outputs)
