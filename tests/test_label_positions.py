"""Logits only where a token is trained (`logits_to_keep`): the GRPO log-probs and the SFT loss,
and their gradients, equal those computed from every position's logits, on rows whose prompts
and completions have different lengths and positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from policy.sft_data import IGNORE, Example, collate
from policy.trainer import Row, pack_rows, token_logprobs


def _model(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def _rows() -> list[Row]:
    # Prompts of 3..9 tokens and completions of 1..6: the kept positions differ per row.
    lengths = [(3, 6), (9, 1), (5, 4), (7, 2)]
    return [Row(list(range(10, 10 + p + c)), p, [-1.0] * c, advantage=0.5) for p, c in lengths]


def test_grpo_logprobs_at_completion_positions_equal_full_logits(tiny_model_dir):
    model = _model(tiny_model_dir)
    batch = pack_rows(_rows(), pad_token_id=0, device=torch.device("cpu"))
    assert batch.completion_positions.numel() < batch.completion_mask.shape[1]

    kept = token_logprobs(model, batch, temperature=0.7)
    (kept * batch.completion_mask).sum().backward()
    kept_grads = _grads(model)

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = torch.log_softmax(logits[:, :-1].float() / 0.7, dim=-1)
    full = full.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    full = full * batch.completion_mask
    full.sum().backward()

    assert torch.allclose(kept, full, atol=1e-6)
    assert (kept[batch.completion_mask == 0] == 0).all()
    for a, b in zip(kept_grads, _grads(model), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_sft_loss_at_label_positions_equals_full_logits(tiny_model_dir):
    model = _model(tiny_model_dir)
    examples = [
        Example(list(range(10, 10 + n)), [0] * p + [1] * (n - p))
        for n, p in [(8, 5), (12, 4), (5, 3)]
    ]
    batch = collate(examples, pad_token_id=0, device=torch.device("cpu"))
    assert batch.label_positions.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10]

    logits = model(**batch.model_inputs()).logits.float()
    assert logits.shape[1] == batch.label_positions.numel()
    kept = F.cross_entropy(
        logits.flatten(0, 1), batch.kept_targets().flatten(), ignore_index=IGNORE, reduction="sum"
    )
    kept.backward()
    kept_grads = _grads(model)

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    full = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
        reduction="sum",
    )  # fmt: skip
    full.backward()

    assert torch.allclose(kept, full, rtol=1e-6)
    for a, b in zip(kept_grads, _grads(model), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
