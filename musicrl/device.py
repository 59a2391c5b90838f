"""The one place that turns a device setting into a ``torch.device``.

Settings name a device as a string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``,
``"xla"`` (TPU through torch_xla) or ``"auto"`` (CUDA when available, else CPU).
torch_xla is imported only when asked for, because it is an optional extra
(``pip install musicrl[tpu]``) and importing it initialises the TPU runtime.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "xla")


def resolve_device(setting: str = "cpu") -> torch.device:
    """Return the torch device for a setting string; unknown names raise ``ValueError``."""
    name = setting.strip().lower()
    kind = name.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise ValueError(
            f"unknown device {setting!r}; expected one of {', '.join(DEVICE_CHOICES)} "
            "(cuda may carry an index, e.g. cuda:1)"
        )
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r} requested but CUDA is not available in this torch build")
        return torch.device(name)
    if kind == "xla":
        try:
            import torch_xla.core.xla_model as xm  # noqa: PLC0415 - optional extra, initialises the TPU runtime
        except ImportError as exc:
            raise ValueError(
                "device 'xla' requested but torch_xla is not installed (pip install 'musicrl[tpu]')"
            ) from exc
        return xm.xla_device()
    return torch.device("cpu")


def set_inference_threads(n_threads: int = 1) -> None:
    """Limit intra-op threads: on a shared 2-core box one thread per process was fastest."""
    torch.set_num_threads(n_threads)
