"""The one place that turns a device setting into a torch device."""

import pytest
import torch

from musicrl.device import resolve_device

pytestmark = pytest.mark.unit


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_xla_without_torch_xla_is_a_clear_error():
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="torch_xla is not installed"):
            resolve_device("xla")
    else:
        pytest.skip("torch_xla is installed: the error path cannot be exercised")
