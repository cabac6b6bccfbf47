"""cosmos-rl's built-in reward functions that scripts import (`cosmos_rl.dispatcher.algo.reward`).

The Cosmos-Reason1 GRPO script sums `single_choice_reward_fn` and `format_reward_fn`. Both are
written here from their documented behaviour in cosmos-rl (the same in the release the guides
pin and in the current one), with cosmos-rl's signature `fn(to_be_evaluated, reference,
**kwargs) -> float`. The others of that module (math_verify-based `boxed_math_reward_fn`,
...) are not provided: an import of one fails naming what is. `overlong_reward_fn` is DAPO's
soft overlong penalty with cosmos-rl's formula, reading `train.train_policy.overlong_reward`
(gantry.config.rewards) from the `config` it is called with.
"""

from __future__ import annotations

import re
from typing import Any

# A completion in the R1 shape: "<think>...</think>\n\n<answer>...</answer>", the think part
# holding no nested think tag, and nothing before or after.
_R1_FORMAT = re.compile(
    r"^<think>([^<]*(?:<(?!/?think>)[^<]*)*)</think>\n\n<answer>([\s\S]*?)</answer>$", re.DOTALL
)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward_fn(to_be_evaluated: str, reference: str | None = None, **kwargs: Any) -> float:
    """1.0 when the completion is exactly `<think>..</think>\\n\\n<answer>..</answer>`, else 0.0."""
    return 1.0 if _R1_FORMAT.search(to_be_evaluated) else 0.0


def _answer_of(text: str) -> str:
    """The content of the first <answer> tag, else the whole text, stripped."""
    match = _ANSWER.search(text)
    return (match.group(1) if match else text).strip()


def single_choice_reward_fn(
    to_be_evaluated: str, reference: str | None = None, **kwargs: Any
) -> float:
    """1.0 when the completion's answer (inside <answer> tags, if any) equals the reference's,
    ignoring case and surrounding space; else 0.0 (also without a reference)."""
    if not isinstance(reference, str) or not isinstance(to_be_evaluated, str):
        return 0.0
    return 1.0 if _answer_of(to_be_evaluated).lower() == _answer_of(reference).lower() else 0.0


def overlong_reward_fn(
    to_be_evaluated: str,
    reference: str | None = None,
    config: Any = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> float:
    """cosmos-rl's overlong_reward_fn: min(-(L - (max_response_length - buffer_length)) /
    buffer_length * penalty_factor, 0), L the tokens of the completion's text re-encoded."""
    if config is None or tokenizer is None:
        raise ValueError("overlong_reward_fn needs config= and tokenizer= (cosmos-rl passes both)")
    overlong = config.train.train_policy.overlong_reward
    length = len(tokenizer.encode(to_be_evaluated, add_special_tokens=False))
    exceed = length - (config.rollout.max_response_length - overlong.buffer_length)
    return min(-exceed / overlong.buffer_length * overlong.penalty_factor, 0.0)


PROVIDED = {
    "format_reward_fn": format_reward_fn,
    "single_choice_reward_fn": single_choice_reward_fn,
    "overlong_reward_fn": overlong_reward_fn,
}
