"""The transformers rollout engine: the model's `generate`, one prompt at a time.

It implements `rollout.engine.RolloutEngine` for fast unit tests and small CPU runs, with the
same conventions as the vLLM engine:

- a completion's `token_ids` end with the EOS or stop token that ended it ("stop"), or stop at
  `max_tokens` ("length");
- `logprobs[i]` is the log-probability of `token_ids[i]` under the distribution it was drawn
  from: `log_softmax` of the processed scores (repetition penalty, then logits / temperature,
  then top-k / top-p masking). With the defaults (top_p 1, top_k off, no penalty) that is
  exactly `log_softmax(logits / temperature)`, what the policy recomputes;
- with `sampling.seed` set, sample j of prompt i is drawn with seed `seed + i * n` for the
  prompt's batch of n (vLLM gives sample j the seed `seed + i * n + j`: the two engines are
  each deterministic, not identical to each other).

Simple and correct beats fast: prompts are generated one by one (no padding to get wrong).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch
from transformers import GenerationConfig

from gantry.comm.protocol import SyncPlan
from gantry.comm.weights import WeightReceiver
from gantry.models.loading import load_pretrained
from rollout.engine import Completion, EnginePrompt, MultimodalPrompt, SamplingSettings


def _eos_ids(model) -> set[int]:
    """EOS ids from the generation config (an int or a list), falling back to the model config."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


class HFEngine:
    """A `RolloutEngine` on a transformers model held in this process."""

    def __init__(
        self, model_path: str, *, device: str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.eval()
        self.model_path = model_path
        self._processor = None  # a VLM's, loaded at the first prompt with media
        self._receiver: WeightReceiver | None = None
        self.eos_ids = _eos_ids(self.model)
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.model.config.pad_token_id
        # generate needs some pad id for finished rows of a batch; any id works since we cut
        # each row at its first stop token ourselves.
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)

    def generate(
        self, prompts: list[EnginePrompt], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        stop_ids = self.eos_ids | set(sampling.stop_token_ids)
        config = self._generation_config(sampling, stop_ids)
        out = []
        for i, prompt in enumerate(prompts):
            seed = None if sampling.seed is None else sampling.seed + i * sampling.n
            out.append(self._generate_one(prompt, config, sampling.n, stop_ids, seed))
        return out

    def _generation_config(self, sampling: SamplingSettings, stop_ids: set[int]):
        greedy = sampling.temperature <= 0.0
        # Every knob is set explicitly: unset ones would fall back to transformers' defaults
        # (top_k=50), which vLLM does not apply.
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else max(sampling.top_k, 0),  # 0: off
            repetition_penalty=sampling.repetition_penalty,
            max_new_tokens=sampling.max_tokens,
            eos_token_id=sorted(stop_ids) or None,
            pad_token_id=self.pad_id,
            num_return_sequences=sampling.n,
            bad_words_ids=[[t] for t in sampling.banned_token_ids] or None,
            output_scores=True,
            return_dict_in_generate=True,
        )

    @torch.no_grad()
    def _generate_one(
        self,
        prompt: list[int],
        config: GenerationConfig,
        n: int,
        stop_ids: set[int],
        seed: int | None,
    ) -> list[Completion]:
        inputs = self._model_inputs(prompt)
        prompt_len = inputs["input_ids"].shape[1]
        # fork_rng: seeding must not disturb the caller's global RNG stream.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            result = self.model.generate(**inputs, generation_config=config)
        new_tokens = result.sequences[:, prompt_len:]
        # scores: one (n, vocab) tensor per step, after the logits processors and warpers.
        logprobs = torch.stack(result.scores, dim=1).float().log_softmax(dim=-1)
        picked = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        seen = inputs["input_ids"][0].tolist() if isinstance(prompt, MultimodalPrompt) else None
        return [
            _completion(new_tokens[j].tolist(), picked[j].tolist(), stop_ids, seen)
            for j in range(n)
        ]

    def _model_inputs(self, prompt: EnginePrompt) -> dict:
        """generate's inputs: the ids, or the processor's ids and pixels for media."""
        if not isinstance(prompt, MultimodalPrompt):
            input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.model_path)
        kwargs = prompt.media.processor_kwargs()
        inputs = self._processor(text=[prompt.text], **kwargs, return_tensors="pt")
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(self.model.named_buffers(remove_duplicate=False))
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"no parameter {name!r} in the model")
            target = params[name]
            if target.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            target.copy_(tensor)

    def read_weights(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.model.state_dict().items()}

    def receive_weights(self, plan: SyncPlan, manifest: str, version: int, replica: str) -> None:
        if self._receiver is None:
            self._receiver = WeightReceiver(self.device)
        self._receiver.receive(plan, manifest, version, replica, 0, self.load_weights)

    def close(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _completion(
    tokens: list[int], logprobs: list[float], stop_ids: set[int], prompt_ids: list[int] | None
) -> Completion:
    """Cut a generated row after its first stop token; rows finished early are padded."""
    for k, token in enumerate(tokens):
        if token in stop_ids:
            return Completion(tokens[: k + 1], logprobs[: k + 1], "stop", prompt_ids)
    return Completion(tokens, logprobs, "length", prompt_ids)
