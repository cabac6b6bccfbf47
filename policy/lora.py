"""LoRA on the policy ([policy.lora]): peft adapters, their merge for rollout and export.

    model = apply_lora(model, config.policy.lora)    # before FSDP2 sharding (policy.parallel)
    merged_parameters(model)      # {HF name: W + scale * B @ A, ...}: what rollout engines get
    merged_state(model)           # the same from the state dict: the merged export
    export_adapter(model, source_dir, out_dir)   # the adapter alone, for PeftModel.from_pretrained

The adapters wrap the model with peft (`get_peft_model`): only the adapters and
`modules_to_save` keep requires_grad, so the optimizer (and the checkpoint, which leaves frozen
parameters out) holds only them. cosmos-rl's matching rules are applied here and handed to peft
as full module names: a `target_modules` entry is a substring of a linear layer's name
('all-linear': every linear layer but the output head), a `modules_to_save` entry a leaf name or
a substring; such modules get no adapter.

The merge is computed per tensor on the policy side, from the sharded parameters: a rank's rows
of W + scale * B @ A are its rows of W and B (both sharded on dim 0 over the same mesh, so their
row ranges coincide) with the whole of A, all-gathered (small: r rows). So it is a collective:
every policy rank calls the merge functions, in the same order.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.tensor import DTensor

from gantry.config.lora import LoraConfig

PREFIX = "base_model.model."  # peft's prefix of the base model's names
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoraError(ValueError):
    """[policy.lora] asks for something this model cannot have."""


def is_lora(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under the adapters (for what reads its submodules by name)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def apply_lora(model: torch.nn.Module, lora: LoraConfig) -> PeftModel:
    """Wrap `model` with LoRA adapters as `lora` says (cosmos-rl's matching rules)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    saved = _modules_to_save(model, lora.modules_to_save or [])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lora.target_modules == "all-linear":
        skip = {name for name, m in model.named_modules() if m is head}
        targets = [n for n in linears if n not in skip]
    else:
        targets = [n for n in linears if any(part and part in n for part in lora.target_modules)]
    targets = [n for n in targets if n not in saved]
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    embeddings = (head, model.get_input_embeddings() if head is not None else None)
    if tied and any(model.get_submodule(n) in embeddings for n in saved):
        # peft trains a copy of one of the two: the other would keep the old weights.
        raise LoraError(
            f"policy.lora.modules_to_save = {lora.modules_to_save} reaches the embeddings, which "
            "this model ties to its output head: leave them out"
        )
    if not targets:
        raise LoraError(
            f"policy.lora.target_modules = {lora.target_modules} matches no linear layer of "
            f"{type(model).__name__} (e.g. {linears[:4]}): name parts of its layers"
        )
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        modules_to_save=saved or None,
        use_rslora=lora.use_rslora,
        rank_pattern=lora.r_pattern or {},
        alpha_pattern=lora.alpha_pattern or {},
        init_lora_weights=lora.init_lora_weights,
    )
    wrapped = get_peft_model(model, config, adapter_name=lora.adapter_name)
    odd = [n for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
    odd = [n for n in odd if not isinstance(wrapped.get_submodule(n), LoraLinear)]
    if odd:
        raise LoraError(f"policy.lora: adapters on linear layers only, not on {odd[:3]}")
    return wrapped


def _modules_to_save(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """Full names of the modules cosmos-rl trains in full: leaf modules (they hold
    parameters directly) whose leaf name is an entry, or whose name contains one."""
    if not wanted:
        return []
    found = []
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in wanted or any(part and part in name for part in wanted):
            found.append(name)
    if not found:
        raise LoraError(f"policy.lora.modules_to_save = {wanted} matches no module of the model")
    return found


def state_dict_options(model: torch.nn.Module) -> StateDictOptions:
    """Checkpoints leave frozen parameters out (the base weights under LoRA): they come from
    the model's own files, so loading must not ask for them (policy.checkpoint)."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def merged_parameters(model: PeftModel, skip: frozenset[str] = frozenset()) -> dict:
    """{base model name: tensor} of the merged model's parameters (a collective when sharded);
    names in `skip` (base names, e.g. a tied head) are left out."""
    entries = _merged(model, model.named_parameters())
    return {name: value for name, value in entries if name not in skip}


def merged_state(model: PeftModel, skip: frozenset[str] = frozenset()) -> list:
    """(base model name, tensor) of the merged model's state dict (a collective when sharded)."""
    return [(n, v) for n, v in _merged(model, model.state_dict().items()) if n not in skip]


def _merged(model: PeftModel, named: Iterable[tuple[str, torch.Tensor]]) -> list:
    adapter = model.active_adapter
    layers = {
        n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)
    }
    wrappers = {
        n.removeprefix(PREFIX)
        for n, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    }
    out = []
    for full_name, value in named:
        name = full_name.removeprefix(PREFIX)
        path, _, leaf = name.rpartition(".")
        owner, _, part = path.rpartition(".")
        if part == "base_layer" and owner in layers:
            layer = layers[owner]
            if leaf == "weight":
                value = _merge(value, layer, adapter)
            out.append((f"{owner}.{leaf}", value))
        elif _inside(path, layers, ("lora_A", "lora_B", "lora_dropout")) or _inside(
            path, wrappers, ("original_module",)
        ):
            continue  # the adapters are in the merged weight; the frozen copy is not exported
        elif _inside(path, wrappers, ("modules_to_save",)):
            module_path = path.split(".modules_to_save.", 1)[0]
            if path == f"{module_path}.modules_to_save.{adapter}":
                out.append((f"{module_path}.{leaf}", value))
        else:
            out.append((name, value))
    return out


def _inside(path: str, owners, parts: tuple[str, ...]) -> bool:
    """Whether `path` is under `<owner>.<part>` for an owner in `owners` and a part in `parts`."""
    for part in parts:
        owner, found, _ = path.partition(f".{part}")
        if found and owner in owners:
            return True
    return False


def _merge(weight: torch.Tensor, layer: LoraLayer, adapter: str) -> torch.Tensor:
    """W + scale * B @ A for this rank's rows of W (see the module doc)."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scale = layer.scaling[adapter]
    with torch.no_grad():
        if not isinstance(weight, DTensor):
            return weight.detach() + (scale * (b.detach() @ _whole(a))).to(weight.dtype)
        if not isinstance(b, DTensor) or b.placements != weight.placements:
            raise LoraError("LoRA merge: lora_B is not sharded like its base weight")
        local = weight.to_local() + (scale * (b.to_local() @ _whole(a))).to(weight.dtype)
        return DTensor.from_local(
            local,
            weight.device_mesh,
            weight.placements,
            run_check=False,
            shape=weight.shape,
            stride=weight.stride(),
        )


def _whole(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value.detach()


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names, whole (a collective when sharded)."""
    adapter = model.active_adapter
    wanted = {
        name: _whole(value).cpu().contiguous()
        for name, value in model.state_dict().items()
        if ".lora_" in name or f".modules_to_save.{adapter}." in name
    }
    return get_peft_model_state_dict(model, state_dict=wanted, adapter_name=adapter)


def export_adapter(model: PeftModel, source_dir: str | Path, out_dir: str | Path) -> Path | None:
    """Write the adapter alone (adapter_model.safetensors, adapter_config.json) to `out_dir`,
    loadable with `PeftModel.from_pretrained(base, out_dir)`. A collective when sharded; rank 0
    writes (into `<out>.tmp`, renamed when complete) and gets the path, the others None."""
    state = adapter_state(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = model.peft_config[model.active_adapter].to_dict()
    config.update(base_model_name_or_path=str(source_dir), task_type="CAUSAL_LM")
    config["inference_mode"] = True
    for key, value in config.items():  # sets (target_modules) are not JSON
        if isinstance(value, set):
            config[key] = sorted(value)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
