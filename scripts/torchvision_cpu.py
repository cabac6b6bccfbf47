"""Make the PyPI torchvision wheel importable next to vLLM's CPU torch (run by scripts/setup.sh).

PyPI's torchvision for Linux is a CUDA build: its C++ ops (`_C.so`) link CUDA libraries that the
CPU torch lacks, so they do not load. torchvision is built to live without them (every op checks
`extension._has_ops()`), except for two fake-tensor registrations in `_meta_registrations.py`
(`torchvision::nms`, `torchvision::qnms`) that fail at import when the ops are missing. This
script guards those two the way the others are guarded. What Gantry uses from torchvision, the
tensor transforms of transformers' Qwen2-VL image and video processors, is pure Python.

    python scripts/torchvision_cpu.py     # idempotent; prints what it did
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GUARD = """def _register_fake_if_ops(name):
    # Added by Gantry's scripts/torchvision_cpu.py: the C++ ops of this CUDA build do not load
    # next to a CPU torch, and a fake kernel cannot be registered for an op that does not exist.
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn


"""
ANCHOR = "@functools.lru_cache(None)\ndef get_meta_lib"
UNGUARDED = "@torch.library.register_fake("


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed: nothing to patch", file=sys.stderr)
        return 1
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    text = path.read_text()
    if "_register_fake_if_ops" in text:
        print(f"{path}: already patched")
        return 0
    if ANCHOR not in text or UNGUARDED not in text:
        print(
            f"{path}: unexpected content; this torchvision needs no patch or a new one",
            file=sys.stderr,
        )
        return 1
    text = text.replace(ANCHOR, GUARD + ANCHOR, 1).replace(UNGUARDED, "@_register_fake_if_ops(")
    path.write_text(text)
    print(f"{path}: guarded the fake-kernel registrations of ops that did not load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
