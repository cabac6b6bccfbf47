"""Reward and DAPO settings of `[train.train_policy]`: overlong shaping, reward weights, the
remote reward server, and DAPO's dynamic-sampling bound.

cosmos-rl's names and defaults where cosmos-rl has the key (`variant`, `overlong_reward`,
`reward_function`, `max_retry_for_on_policy`, as read in cosmos_rl/policy/config/__init__.py);
`reward_server` is Gantry's own (cosmos-rl's `use_remote_reward` is an enqueue/fetch protocol of
its video reward service with URLs from environment variables, which Gantry does not speak).
Fields of TrainPolicyConfig (gantry.config.training). Imports no torch.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from gantry.config.cluster import _MODEL_CONFIG


class OverlongRewardConfig(BaseModel):
    """[train.train_policy.overlong_reward]: DAPO's soft overlong penalty (cosmos-rl's keys)."""

    model_config = _MODEL_CONFIG

    enable_overlong_penalty: bool = Field(
        default=False,
        description="Add DAPO's soft overlong penalty to every completion's reward: 0 up to "
        "rollout.max_response_length - buffer_length tokens, then falling linearly to "
        "-penalty_factor at max_response_length (the reward part 'overlong'). Naming "
        "'overlong' in reward_function applies it too, with that weight, as cosmos-rl does.",
    )
    buffer_length: int = Field(
        default=4096,
        gt=0,
        description="Tokens before rollout.max_response_length over which the penalty rises "
        "from 0 to penalty_factor; must be at most rollout.max_response_length.",
    )
    penalty_factor: float = Field(
        default=1.0,
        ge=0,
        description="The penalty at rollout.max_response_length tokens (subtracted from the "
        "reward).",
    )


class RewardServerConfig(BaseModel):
    """[train.train_policy.reward_server]: the user's own scorer over HTTP (Gantry's keys)."""

    model_config = _MODEL_CONFIG

    url: str = Field(
        default="",
        description="The scorer's endpoint: each group's completions are POSTed to it as JSON "
        "{completions, sample, prompt_id} and it answers {rewards: [..]} (optionally "
        "{infos: [{..}, ..]}); the reward part is named `name`. Empty: no remote reward.",
    )
    name: str = Field(
        default="remote",
        min_length=1,
        description="The reward part's name (metrics reward/<name>).",
    )
    timeout: float = Field(
        default=30.0, gt=0, description="Seconds one request may take before it is retried."
    )
    retries: int = Field(
        default=3,
        ge=0,
        description="Retries of a request that failed to connect, timed out or got a 502/503/504, "
        "with exponential backoff (0.5 s, 1 s, 2 s, ...); then the run stops naming the URL.",
    )

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value


def reward_weights(reward_function: str | list[str] | dict[str, float] | None) -> dict[str, float]:
    """cosmos-rl's normalisation of `reward_function`: a name -> {name: 1}, a list -> each 1."""
    if reward_function is None:
        return {}
    if isinstance(reward_function, str):
        return {reward_function: 1.0}
    if isinstance(reward_function, list):
        return dict.fromkeys(reward_function, 1.0)
    return dict(reward_function)


def overlong_penalty(length: int, max_length: int, buffer_length: int, factor: float) -> float:
    """DAPO's soft overlong punishment as cosmos-rl computes it (overlong_reward_fn):
    min(-(length - (max_length - buffer_length)) / buffer_length * factor, 0)."""
    exceed = length - (max_length - buffer_length)
    return min(-exceed / buffer_length * factor, 0.0)
