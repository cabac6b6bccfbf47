"""The `[policy.lora]` section: train LoRA adapters (peft) instead of all the weights.

Keys and defaults are cosmos-rl's `LoraConfig` (cosmos_rl/policy/config/__init__.py), with its
matching rules: `target_modules` and `modules_to_save` entries are substrings of module names,
`r_pattern` / `alpha_pattern` keys regexes matched as `(.*\\.)?(key)$`, first match wins. What
Gantry cannot honour (several adapters, loading a pre-trained adapter, data-driven
initialisations) is refused with one line. policy/lora.py applies it. Imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from gantry.config.cluster import _MODEL_CONFIG

# cosmos-rl's init_lora_weights values; Gantry honours True, False and "gaussian".
_INIT_REFUSED = (
    "is not implemented by Gantry (data-driven or base-modifying initialisations): "
    "use true, false or 'gaussian'"
)


class LoraConfig(BaseModel):
    """[policy.lora]: LoRA adapters on the policy's linear layers (peft).

    Only the adapters (and `modules_to_save`) train and are checkpointed; rollout engines get
    the merged weights W + scale * B @ A under the base model's names; the export is the merged
    model, or the adapter alone with train.ckpt.export_lora_adapter.
    """

    model_config = _MODEL_CONFIG

    r: int = Field(default=8, gt=0, description="LoRA rank.")
    lora_names: list[str] = Field(
        default=["default"],
        min_length=1,
        description="Names of the adapters; Gantry trains one adapter (one name).",
    )
    lora_path: str | None = Field(
        default=None,
        description="Path to pre-trained LoRA weights (cosmos-rl's key). Not implemented by "
        "Gantry: must stay unset.",
    )
    lora_alpha: float = Field(
        default=8.0, strict=False, description="LoRA alpha: the adapter's scale is alpha / r."
    )
    lora_dropout: float = Field(
        default=0.0, ge=0, lt=1, strict=False, description="Dropout on the adapter's input."
    )
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        default=None,
        description="Linear layers that get an adapter: a list of substrings of module names "
        "(e.g. ['q_proj', 'v_proj']), or 'all-linear' (every linear layer but the output "
        "head). Required.",
    )
    primary_adapter: str | None = Field(
        default=None,
        description="The adapter used for rollout and export; with one adapter, unset or its name.",
    )
    use_rslora: bool = Field(
        default=False,
        description="Rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r.",
    )
    modules_to_save: list[str] | None = Field(
        default=None,
        description="Modules trained in full besides the adapters, and saved with them "
        "(substrings of module names, or leaf names, e.g. ['lm_head']); they get no adapter.",
    )
    alpha_pattern: dict[str, float] | None = Field(
        default=None,
        strict=False,
        description="Per-module lora_alpha: regex keys matched against module names, first "
        "match wins.",
    )
    r_pattern: dict[str, int] | None = Field(
        default=None,
        description="Per-module rank r: regex keys matched against module names, first match wins.",
    )
    init_lora_weights: bool | str = Field(
        default=True,
        description="Adapter initialisation: true (B = 0, so the adapter starts as a no-op), "
        "false (random A and B, for debugging) or 'gaussian'.",
    )

    @field_validator("init_lora_weights")
    @classmethod
    def _init_supported(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and value != "gaussian":
            raise ValueError(f"init_lora_weights = {value!r} {_INIT_REFUSED}")
        return value

    @field_validator("lora_path")
    @classmethod
    def _no_path(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "loading pre-trained LoRA weights is not implemented by Gantry: remove lora_path "
                "(or merge that adapter into the model and train from the merged model)"
            )
        return value

    @model_validator(mode="after")
    def _one_adapter(self) -> LoraConfig:
        if len(self.lora_names) != 1:
            raise ValueError(
                f"lora_names = {self.lora_names}: Gantry trains one adapter; give one name"
            )
        if self.primary_adapter not in (None, self.lora_names[0]):
            raise ValueError(
                f"primary_adapter = {self.primary_adapter!r} is not in lora_names "
                f"{self.lora_names}: remove it or name the adapter"
            )
        if not self.target_modules:
            raise ValueError(
                "target_modules is required: a list of module-name substrings (e.g. "
                "['q_proj', 'k_proj', 'v_proj', 'o_proj']) or 'all-linear'"
            )
        return self

    @property
    def adapter_name(self) -> str:
        return self.lora_names[0]
