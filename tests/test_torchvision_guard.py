"""gantry.models.torchvision_guard: torchvision imports next to a torch its C++ ops do not match,
in any process of the environment, with no installed file changed (docs/setup.md)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest


def run_fresh(code: str) -> str:
    """Run `code` in a new interpreter of this environment; its stdout."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_importing_torch_installs_the_guard():
    """torch runs Gantry's "torch.backends" entry point: no Gantry import needed first."""
    out = run_fresh(
        """
        import sys
        import torch
        print(sorted(type(f).__name__ for f in sys.meta_path))
        """
    )
    assert "_TorchvisionImportHook" in out, "pyproject's torch.backends entry point is missing"


@pytest.mark.slow  # a fresh interpreter imports torch, torchvision (and transformers)
def test_transformers_models_and_torchvision_import_in_a_process_that_never_imported_gantry():
    pytest.importorskip("transformers")
    try:
        importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchvision is not installed")
    out = run_fresh(
        """
        from transformers import PreTrainedModel  # imports torchvision when it is installed
        import torch, torchvision
        if torchvision.extension._has_ops():
            print("ops loaded")
        else:
            assert hasattr(torch.ops.torchvision, "nms")  # declared by the guard, no kernel
            try:
                torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
            except RuntimeError as exc:
                print("nms refused:", str(exc)[:40])
        """
    )
    assert out.startswith(("ops loaded", "nms refused: Couldn't load custom C++ ops")), out


def test_nothing_is_declared_without_torchvision(monkeypatch):
    from gantry.models import torchvision_guard

    monkeypatch.setattr(torchvision_guard, "_extension_path", lambda: None)
    assert torchvision_guard.declare_ops_that_did_not_load() == []


@pytest.mark.slow  # a fresh interpreter imports torch, torchvision (and transformers)
def test_torchvision_imported_before_torch_imports_too():
    """`import torchvision` first: torchvision imports torch, whose entry point then runs while
    torchvision is half imported; the ops must be declared right then."""
    try:
        importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchvision is not installed")
    out = run_fresh("import torchvision; print('imported', torchvision.__version__)")
    assert out.startswith("imported"), out
