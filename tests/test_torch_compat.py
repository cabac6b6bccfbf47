"""The private torch APIs Gantry uses (`gantry.comm.torch_compat`): all there in the installed
torch, and a missing one stops the import with the torch version and the name."""

import importlib

import pytest
import torch
import torch.distributed.tensor._utils as dtensor_utils
from torch._C._distributed_c10d import Backend

import gantry.comm.torch_compat as torch_compat

# Names are looked up on the module at each use: a test below re-imports it.


def test_the_installed_torch_has_every_private_api_gantry_uses():
    assert torch_compat.missing_in_torch() == []
    torch_compat.check_torch()


def test_a_missing_private_function_stops_the_import_with_the_version_and_the_name(monkeypatch):
    monkeypatch.delattr(dtensor_utils, "compute_local_shape_and_global_offset")
    try:
        with pytest.raises(RuntimeError) as raised:
            importlib.reload(torch_compat)  # the check runs at import
    finally:
        monkeypatch.undo()
        importlib.reload(torch_compat)
    assert type(raised.value).__name__ == "TorchInternalsMissing"
    message = str(raised.value)
    assert f"torch {torch.__version__} lacks" in message
    assert "torch.distributed.tensor._utils.compute_local_shape_and_global_offset" in message


def test_a_missing_process_group_timeout_option_is_named(monkeypatch):
    # Every backend's options inherit `_timeout` from c10d's Backend.Options.
    monkeypatch.delattr(Backend.Options, "_timeout")
    with pytest.raises(torch_compat.TorchInternalsMissing) as raised:
        torch_compat.check_torch()
    assert f"torch {torch.__version__} lacks" in str(raised.value)
    assert raised.value.missing == [
        f"torch.distributed.{torch_compat._store_group_class().__name__}.Options._timeout"
    ]
