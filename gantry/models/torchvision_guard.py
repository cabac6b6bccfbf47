"""Let torchvision import next to a CPU torch whose build its C++ ops do not match.

Why: vLLM's CPU build pins torch 2.13.0+cpu, and the only torchvision 0.28.0 that PyPI has is a
CUDA build: its C++ ops (`_C.so`) link torch's CUDA libraries, so they do not load. torchvision
is made to live without them (`torchvision.extension._has_ops()` is then False and every op says
so when called), except that its `_meta_registrations` registers fake kernels for two ops,
`torchvision::nms` and `torchvision::qnms`, without checking, and that fails at import
("operator torchvision::nms does not exist"). `import torchvision` then fails, and with it
`from vllm import LLM` and every Qwen2-VL processor of transformers (their video processors
need torchvision's tensor transforms, which are pure Python).

What: `guard_torchvision_import()` puts an import hook first on `sys.meta_path`. Right before
torchvision is first imported, the hook loads torchvision's `_C` the way torchvision would; only
when that fails does it declare the schemas of those two ops (no kernels), so that the fake
kernels register and the import succeeds. Calling `torchvision.ops.nms` still fails with
torchvision's own message. A torchvision whose ops load (GPU machines) is left alone, and no
installed file is changed. The hook imports nothing until torchvision is imported, so processes
that never import torchvision (the controller) pay nothing.
"""

from __future__ import annotations

import importlib.machinery
import sys

# The two ops `torchvision/_meta_registrations.py` registers fake kernels for without checking
# that the C++ ops loaded; their schemas as torchvision's C++ code declares them.
UNCHECKED_OP_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _extension_path() -> str | None:
    """Path of the installed torchvision's `_C` extension, found without importing torchvision."""
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for folder in spec.submodule_search_locations:
        found = importlib.machinery.FileFinder(folder, loader).find_spec("torchvision._C")
        if found is not None and found.origin:
            return found.origin
    return None


def declare_ops_that_did_not_load() -> list[str]:
    """Load torchvision's `_C` as torchvision does; when it does not load, declare the schemas
    of the ops its fake kernels need. Returns the op names declared (none when `_C` loaded)."""
    import torch

    path = _extension_path()
    if path is None:
        return []
    try:
        torch.ops.load_library(path)
        return []
    except (ImportError, OSError):  # the CUDA build's _C next to a CPU torch: missing libraries
        pass
    declared = []
    for name, schema in UNCHECKED_OP_SCHEMAS.items():
        namespace, op = name.split("::")
        if not hasattr(getattr(torch.ops, namespace), op):
            torch.library.define(name, schema)
            declared.append(name)
    return declared


class _TorchvisionImportHook:
    """A meta-path finder that finds nothing: it acts once, before torchvision's first import.
    It stays on `sys.meta_path` (the import system iterates that list while calling it)."""

    def __init__(self) -> None:
        self.done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not self.done:
            self.done = True
            declare_ops_that_did_not_load()
        return None


def guard_torchvision_import() -> None:
    """Make the next `import torchvision` succeed next to a torch its C++ ops do not match.
    Idempotent; does nothing once torchvision is imported."""
    if "torchvision._meta_registrations" in sys.modules:
        return  # torchvision is imported: too late, and nothing to do
    if "torchvision" in sys.modules:
        # `import torchvision` came first and is importing torch right now (torch runs this
        # entry point at the end of its own import): declare before torchvision goes on.
        declare_ops_that_did_not_load()
        return
    if any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionImportHook())
