"""The rollout engine protocol: what the rollout worker needs from a generator.

Two implementations: `rollout.vllm_engine.VLLMEngine` (the engine of every real run, CUDA or
CPU build of vLLM) and `rollout.hf_engine.HFEngine` (transformers `generate`, for fast unit
tests). `make_engine` picks one from the config's `rollout.backend`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from gantry.comm.protocol import SyncPlan


@dataclass
class SamplingSettings:
    """How to sample; mirrors `[rollout.sampling_config]` plus the rollout lengths."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    banned_token_ids: list[int] = field(default_factory=list)  # never sampled (VLM placeholders)


@dataclass
class MultimodalPrompt:
    """A prompt with images or videos: chat-templated text with one placeholder per item, and
    the items loaded by `gantry.data.media.load_media` (a `LoadedMedia`)."""

    text: str
    media: Any


# Token ids (text-only), or text with media.
EnginePrompt = list[int] | MultimodalPrompt


@dataclass
class Completion:
    """One sampled completion: its tokens and the log-probability of each under the sampler.

    `logprobs[i]` is log p(token_ids[i] | prefix) of the distribution the token was drawn
    from, i.e. `log_softmax(logits / temperature)`, so the policy can form importance ratios.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or stop token) or "length"
    # The prompt's ids as the model saw them (media placeholders expanded to patch tokens);
    # set for multimodal prompts, whose ids only the engine knows.
    prompt_token_ids: list[int] | None = None


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[EnginePrompt], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        """For each prompt (token ids, or a MultimodalPrompt), `sampling.n` completions, in
        prompt order."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (HF parameter name, tensor) pairs in place; later generations use them."""

    def receive_weights(self, plan: SyncPlan, manifest: str, version: int, replica: str) -> None:
        """Take part in weight sync `plan` as replica `replica` (all of its TP ranks), loading
        the weights in place as they arrive; `manifest` is the policy's, as JSON."""

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The engine's current weights under HF names (for tests and checks)."""

    def close(self) -> None:
        """Release the engine's memory and processes."""
