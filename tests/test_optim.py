"""The learning-rate schedule: warm-up, then linear or cosine decay to the floor."""

import math

import pytest
import torch

from gantry.config import load_config
from policy.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps


def test_warmup_then_linear_decay_hand_computed():
    f = [lr_factor(s, warmup=2, total=6, decay="linear", min_factor=0.2) for s in range(6)]
    # warm-up 1/2, 2/2; then decay over steps 2..5 (progress 0, 1/3, 2/3, 1) to 0.2
    assert f == pytest.approx([0.5, 1.0, 1.0, 0.2 + 0.8 * 2 / 3, 0.2 + 0.8 / 3, 0.2])


def test_cosine_and_constant():
    cos = [lr_factor(s, warmup=0, total=5, decay="cosine", min_factor=0.0) for s in range(5)]
    assert cos == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    )
    assert all(lr_factor(s, warmup=0, total=5, decay=None, min_factor=0.1) == 1.0 for s in range(5))


def test_scheduler_from_config_applies_to_the_optimizer():
    config = load_config(None, ["train.optm_lr=0.1", "train.optm_warmup_steps=0.5",
                                "train.optm_decay_type=\"linear\"", "train.optm_impl=\"for-loop\""])  # fmt: skip
    assert warmup_steps(config.train, 4) == 2
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([param], config.train)
    assert isinstance(optimizer, torch.optim.AdamW)
    scheduler = build_scheduler(optimizer, config.train, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.0])


def test_train_epsilon_is_the_optimizer_eps():
    """cosmos-rl's train.epsilon reaches AdamW: with a large eps the first step is visibly
    smaller than with torch's default (AdamW's first step is lr * g / (|g| + eps))."""
    steps = {}
    for eps in (1e-8, 1.0):
        config = load_config(None, ["train.optm_lr=0.1", f"train.epsilon={eps}",
                                    'train.optm_impl="for-loop"'])  # fmt: skip
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = build_optimizer([param], config.train)
        assert optimizer.param_groups[0]["eps"] == eps
        param.grad = torch.ones(1)
        optimizer.step()
        steps[eps] = -param.item()
    assert steps[1e-8] == pytest.approx(0.1, rel=1e-5)
    assert steps[1.0] == pytest.approx(0.1 / 2, rel=1e-3)  # bias-corrected sqrt(v) = 1


def test_a_non_finite_gradient_is_never_applied():
    """The trainer's optimizer step refuses a NaN/inf gradient norm before any weight moves,
    and clears the gradients; the error ends the run rather than restarting it."""
    from types import SimpleNamespace

    from gantry.run.errors import NonFiniteError
    from gantry.run.runtime import is_deterministic
    from policy.trainer import Trainer

    config = load_config(None, ['train.optm_impl="for-loop"'])
    model = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model.parameters(), config.train)
    scheduler = build_scheduler(optimizer, config.train, total_steps=4)
    model(torch.tensor([[float("inf"), 1.0]])).sum().backward()
    trainer = SimpleNamespace(config=config, model=model, optimizer=optimizer, scheduler=scheduler)
    with pytest.raises(NonFiniteError, match="optimizer step 1: the gradient norm is") as info:
        Trainer._optimizer_step(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert is_deterministic(info.value, started=True)
