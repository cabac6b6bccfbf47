"""SFT examples: a conversation (with its images and videos) -> token ids, the loss mask, and the
vision inputs; and micro-batches of examples.

The loss mask covers exactly the assistant turns: the tokens of each assistant message as the
chat template renders it, up to and including the token that ends the turn (`<|im_end|>` for
ChatML), so the model learns to stop; the system and user turns, the template's
`<|im_start|>assistant\\n` header and the newline between turns are masked. The spans are found
by rendering the conversation's prefixes: the text of the conversation up to an assistant turn,
with the generation prompt, must be a prefix of the whole text (true of ChatML and of Qwen's
templates; a template that rewrites earlier turns is reported).

For a vision-language model the processor (image processor + tokenizer + chat template) turns
the text and the media loaded by `gantry.data.media` into ids in which each image / video placeholder
is expanded to its patch tokens; the mask is expanded with it (those tokens are never trained).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

import torch

from gantry.data.media import has_media, load_media
from gantry.models.loading import load_text_front_end
from policy.vision import VisionInputs, merge_vision, missing_kinds

IGNORE = -100


class SampleError(ValueError):
    """A sample that cannot be trained on; the message names its index and id."""


@dataclass
class Example:
    """One conversation ready to train on."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is an assistant token (aligned with input_ids)
    vision: VisionInputs = field(default_factory=VisionInputs)  # processor outputs
    filler: bool = False  # a blank row that keeps FSDP's collectives in step (policy.vision)
    truncated: bool = False  # cut at policy.model_max_length

    @property
    def assistant_tokens(self) -> int:
        return sum(self.loss_mask)


def _name(sample, index: int) -> str:
    sample_id = sample.get("id") if isinstance(sample, dict) else None
    return f"sample {index}" + (f" (id {sample_id})" if sample_id is not None else "")


class ConversationEncoder:
    """Encodes a dataset sample's `messages` with the model's tokenizer or processor."""

    def __init__(self, model_path: str, max_length: int, vision: bool) -> None:
        self.processor, self.tokenizer = load_text_front_end(model_path, vision)
        self.templater = self.processor or self.tokenizer
        self.max_length = max_length

    def encode(self, sample, index: int) -> Example:
        messages = sample.get("messages") if isinstance(sample, dict) else None
        if not isinstance(messages, list) or not messages:
            raise SampleError(f"{_name(sample, index)}: no 'messages' list")
        if not any(m.get("role") == "assistant" for m in messages):
            raise SampleError(f"{_name(sample, index)}: no assistant turn to train on")
        media = load_media(messages) if has_media(messages) else None
        shown = media.placeholder_messages if media is not None else messages
        text, spans = self._render(shown, sample, index)
        ids, mask = self._tokenize(text, spans)
        example = Example(ids, mask)
        if media is not None:
            example = self._with_vision(example, text, media)
        return self._fit(example, sample, index, media is not None)

    def _render(self, messages: list[dict], sample, index: int) -> tuple[str, list[tuple]]:
        """The conversation's text and the character spans of its assistant turns."""
        template = self.templater.apply_chat_template
        text = template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            turn = template(messages[: i + 1], tokenize=False)
            if not (text.startswith(head) and text.startswith(turn)):
                raise SampleError(
                    f"{_name(sample, index)}: the chat template renders turn {i} differently "
                    "inside the whole conversation; the assistant tokens cannot be located"
                )
            spans.append((len(head), len(turn.rstrip())))
        return text, spans

    def _tokenize(self, text: str, spans: list[tuple]) -> tuple[list[int], list[int]]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), span_mask(encoded["offset_mapping"], spans)

    def _with_vision(self, example: Example, text: str, media) -> Example:
        outputs = self.processor(text=[text], **media.processor_kwargs(), return_tensors="pt")
        expanded = outputs["input_ids"][0].tolist()
        mask = expand_mask(example.input_ids, example.loss_mask, expanded, self._pad_ids())
        return Example(expanded, mask, VisionInputs.of(outputs))

    def _pad_ids(self) -> set[int]:
        return {self.processor.image_token_id, self.processor.video_token_id}

    def _fit(self, example: Example, sample, index: int, vision: bool) -> Example:
        if len(example.input_ids) <= self.max_length:
            return example
        if vision:
            raise SampleError(
                f"{_name(sample, index)}: {len(example.input_ids)} tokens with its media, more "
                f"than policy.model_max_length = {self.max_length}; raise it, or lower "
                "max_pixels / fps in [custom.vision]"
            )
        cut = self.max_length
        return Example(example.input_ids[:cut], example.loss_mask[:cut], truncated=True)


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters lie inside one of `spans`. Offsets ascend, so each
    span covers one run of tokens, found by bisection rather than by testing every token."""
    starts, ends = [start for start, _ in offsets], [end for _, end in offsets]
    mask = [0] * len(offsets)
    for lo, hi in spans:
        first, stop = bisect.bisect_left(starts, lo), bisect.bisect_right(ends, hi)
        mask[first:stop] = [1] * max(stop - first, 0)
    return mask


def expand_mask(
    ids: list[int], mask: list[int], expanded: list[int], pad_ids: set[int]
) -> list[int]:
    """The mask of `ids` carried over to `expanded`, where each media pad token of `ids`
    became a run of pad tokens (masked)."""
    out: list[int] = []
    j = 0
    for token, keep in zip(ids, mask, strict=True):
        if token in pad_ids:
            run = j
            while run < len(expanded) and expanded[run] == token:
                run += 1
            if run == j:
                raise ValueError(f"media token {token} of the text has no patch tokens")
            out.extend([0] * (run - j))
            j = run
            continue
        if j >= len(expanded) or expanded[j] != token:
            raise ValueError("the processor's ids differ from the tokenizer's outside the media")
        out.append(keep)
        j += 1
    if j != len(expanded):
        raise ValueError("the processor's ids are longer than the tokenizer's")
    return out


@dataclass
class MicroBatch:
    """Examples right-padded into tensors; `targets` is input_ids shifted, IGNORE where masked.

    `label_positions` are the positions at which some row predicts a trained token: the model
    computes logits there only (`logits_to_keep`), so prompts, media patches and padding never
    go through the vocabulary projection and its cross-entropy (the largest activation of a
    real model: 4k tokens x 152k vocabulary in float32 is 2.4 GB)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1]
    label_positions: torch.Tensor  # [K], ascending, each < L-1
    vision: dict[str, torch.Tensor]
    tokens: int  # non-pad tokens
    assistant_tokens: int

    def model_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "logits_to_keep": self.label_positions,
            **self.vision,
        }

    def kept_targets(self) -> torch.Tensor:
        """The targets at `label_positions`, aligned with the logits the model returns: [B, K]."""
        return self.targets[:, self.label_positions]

    def to(self, device: torch.device) -> MicroBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            targets=self.targets.to(device),
            label_positions=self.label_positions.to(device),
            vision={k: v.to(device) for k, v in self.vision.items()},
        )


def with_fillers(examples: list[Example], fillers: dict) -> list[Example]:
    """`examples` plus a blank image / video row (`policy.vision.vision_fillers`) for each kind
    of media none of them has."""
    missing = missing_kinds([e.vision for e in examples]) if fillers else []
    blanks = [
        Example(fillers[k][0], [0] * len(fillers[k][0]), fillers[k][1], True) for k in missing
    ]
    return examples + blanks


def collate(examples: list[Example], pad_token_id: int, device: torch.device) -> MicroBatch:
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), length - 1), IGNORE, dtype=torch.long)
    for i, example in enumerate(examples):
        ids = torch.tensor(example.input_ids)
        end = len(ids)
        input_ids[i, :end] = ids
        attention_mask[i, :end] = 1
        keep = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
        # Token t is predicted at position t - 1.
        targets[i, : end - 1] = torch.where(keep, ids[1:], IGNORE)
    vision = merge_vision([e.vision for e in examples], device)
    real = torch.tensor([not e.filler for e in examples])
    trained = targets != IGNORE
    label_positions = trained.any(dim=0).nonzero().squeeze(1)
    return MicroBatch(
        input_ids.to(device),
        attention_mask.to(device),
        targets.to(device),
        label_positions.to(device),
        vision,
        tokens=int(attention_mask[real].sum()),
        assistant_tokens=int(trained.sum()),
    )
