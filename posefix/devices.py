"""The device a command runs on: one reading of ``--device`` (and of ``train.device``) for every command."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch

# The help of every command's --device.
DEVICE_HELP = "cpu, cuda, cuda:N or auto: cuda if available"


def resolve_device(name: str | torch.device, option: str = "--device") -> torch.device:
    """The device ``name`` names: "auto" (cuda where a CUDA device is available, else cpu), "cpu", "cuda",
    "cuda:N" or any other torch device name (e.g. "meta"); a torch.device is checked as it is.

    Raises an InputError naming ``option`` where the device cannot be used here: not a device name, CUDA
    asked for on a machine without a CUDA device, or an index beyond its devices.
    """
    import torch  # here: the command line's parser reads DEVICE_HELP without loading torch

    if isinstance(name, str) and name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise InputError(option, str(e).splitlines()[0]) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(option, f"{device} was asked for but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(option, f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device
