"""Device placement, checked where work starts. Every sampler and evaluator entry point calls
`check_placement` with the device it runs on and the modules it will call: a module left on
another device is a one-line error naming it, before any compute, instead of a device-mismatch
crash minutes into a stage on a GPU. Tests run stage code with a `meta` device (see
tests/test_placement.py), so placement is checked on the CPU."""

from __future__ import annotations

import torch

from .errors import HDLibError


class DevicePlacementError(HDLibError, RuntimeError):
    """A module is not on the device its caller runs on."""


def module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of a module's first parameter (or buffer); None for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """'cuda' and 'cuda:0' are the same device when one of them names no index."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_placement(where: str, device: torch.device | str, **modules) -> None:
    """Raise DevicePlacementError when a given module (None is skipped) is not on `device`."""
    for name, module in modules.items():
        if module is None:
            continue
        dev = module_device(module)
        if dev is not None and not same_device(dev, device):
            raise DevicePlacementError(f"{where}: {name} is on {dev} but this runs on {torch.device(device)}; "
                                       f"move it first ({name}.to({str(device)!r}))")


def set_deterministic(device: torch.device | str) -> None:
    """Deterministic kernels where the device has a choice (cuDNN picks the fastest, not always the
    same, algorithm unless told otherwise): the tests' bit-identical weights hold on a GPU too."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
