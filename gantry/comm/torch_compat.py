"""Every private torch API that Gantry uses, in one place, checked when this module is imported.

torch's underscore names change between releases without notice. Gantry reaches them only
through this module, which checks on import (the policy imports it with its export, the weight
sync with its process groups) that each one exists, and raises `TorchInternalsMissing` naming
the torch version and every missing name: a torch upgrade stops a run at start, not halfway
through an export or a weight sync.

- `torch.distributed.tensor._utils.compute_local_shape_and_global_offset`: where a DTensor's
  local shard lies in the full tensor, without a gather (the export writes each rank's rows
  in place). torch has no public equivalent.
- `_timeout` of c10d's backend options: a process group built from a store
  (`ProcessGroupNCCL(store, rank, size, options)`, as the weight sync's groups are) takes its
  timeout only there. Checked on `ProcessGroupNCCL.Options` where torch has NCCL; a CPU-only
  build has no NCCL, and the check looks at `ProcessGroupGloo.Options`, which inherits the
  same attribute from `Backend.Options`.

Public torch APIs (DTensor, FSDP2, distributed checkpoint, `torch.multiprocessing.reductions`)
are used directly where they are needed.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TESTED_TORCH = "2.11 (CUDA) and 2.13 (CPU)"

_DTENSOR_UTILS = "torch.distributed.tensor._utils"
# (module, name) of each private function used.
PRIVATE_NAMES = ((_DTENSOR_UTILS, "compute_local_shape_and_global_offset"),)
OPTIONS_TIMEOUT = "_timeout"


class TorchInternalsMissing(RuntimeError):
    """This torch lacks private APIs Gantry uses: names them, with the version."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            f"torch {torch.__version__} lacks what Gantry uses: {', '.join(missing)} "
            f"(Gantry is tested with torch {TESTED_TORCH}; install a version pyproject.toml "
            "allows)"
        )


def missing_in_torch() -> list[str]:
    """The private torch names this torch lacks (empty when all are there)."""
    missing = []
    for module, name in PRIVATE_NAMES:
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError:
            found = False
        if not found:
            missing.append(f"{module}.{name}")
    group = _store_group_class()
    if group is not None and not hasattr(getattr(group, "Options", None), OPTIONS_TIMEOUT):
        missing.append(f"torch.distributed.{group.__name__}.Options.{OPTIONS_TIMEOUT}")
    return missing


def check_torch() -> None:
    """Raise TorchInternalsMissing unless every private torch name Gantry uses exists."""
    missing = missing_in_torch()
    if missing:
        raise TorchInternalsMissing(missing)


def _store_group_class() -> Any:
    """The process group class whose options' timeout the weight sync sets: NCCL's, or on a
    build without NCCL gloo's (the same inherited attribute). None: no c10d at all."""
    if not dist.is_available():
        return None
    return dist.ProcessGroupNCCL if dist.is_nccl_available() else dist.ProcessGroupGloo


def compute_local_shape_and_global_offset(
    global_shape: Sequence[int], mesh: Any, placements: Sequence[Any]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape of this rank's shard, offset of its first element in each dim) of a DTensor of
    `global_shape` laid out on `mesh` with `placements`."""
    function = importlib.import_module(_DTENSOR_UTILS).compute_local_shape_and_global_offset
    return function(global_shape, mesh, placements)


def nccl_options(timeout: timedelta) -> Any:
    """`ProcessGroupNCCL.Options` with `timeout`, for a group built from a store."""
    options = dist.ProcessGroupNCCL.Options()
    setattr(options, OPTIONS_TIMEOUT, timeout)
    return options


check_torch()
