"""Engine prompts from dataset samples: chat-templated token ids, or text with images/videos.

A text-only prompt is its token ids (one tokenizer call per batch). A prompt with media is a
`MultimodalPrompt`: the chat-templated text with one placeholder per image / video and the
media loaded by `gantry.data.media` (resized and frame-sampled once, here); vLLM expands the
placeholders to patch tokens itself, and the transformers engine through the processor. The
engine reports the ids the model saw (placeholders expanded) with each completion, which is
what the policy trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gantry.data.media import has_media, load_media
from gantry.data.plugin import prompt_messages
from gantry.models.loading import is_vision_language, load_text_front_end, media_token_ids
from rollout.engine import EnginePrompt, MultimodalPrompt


class PromptBuilder:
    """Turns samples into engine prompts with the model's tokenizer (and processor, for a VLM)."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        self.vision = is_vision_language(config)
        self.banned_token_ids = media_token_ids(config)
        self.processor, self.tokenizer = load_text_front_end(model_path, self.vision)
        self.templater = self.processor or self.tokenizer

    def build(
        self, samples: Sequence, indices: list[int], script_path: Path | str = ""
    ) -> list[EnginePrompt]:
        """The prompts of `samples[i]` for i in `indices`: the messages before the last
        assistant turn, with the generation prompt."""
        return self.build_with_texts(samples, indices, script_path)[0]

    def build_with_texts(
        self, samples: Sequence, indices: list[int], script_path: Path | str = ""
    ) -> tuple[list[EnginePrompt], list[str]]:
        """`build`'s prompts, and each one's chat-templated text (what the logged sample
        completions show as the prompt)."""
        prompts: list[EnginePrompt | None] = []
        all_texts, texts, text_slots = [], [], []
        for i in indices:
            messages = prompt_messages(samples[i], script_path, i)
            if self.vision and has_media(messages):
                media = load_media(messages)
                text = self._template(media.placeholder_messages)
                prompts.append(MultimodalPrompt(text=text, media=media))
            else:
                text = self._template(messages)
                text_slots.append(len(prompts))
                texts.append(text)
                prompts.append(None)
            all_texts.append(text)
        if texts:
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for slot, token_ids in zip(text_slots, ids, strict=True):
                prompts[slot] = list(token_ids)
        return prompts, all_texts

    def _template(self, messages: list[dict]) -> str:
        return self.templater.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
