"""Where a model lives: its device and dtype, another model moved to follow it, and ``"auto"`` devices."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["module_device", "module_dtype", "follow", "resolve_device"]


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else first buffer; CPU for a module with neither).

    Example:
        >>> import torch
        >>> module_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (else buffer; else torch's default dtype).

    Example:
        >>> import torch
        >>> module_dtype(torch.nn.Linear(2, 2).double())
        torch.float64
    """
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def follow(model: nn.Module, leader: nn.Module) -> nn.Module:
    """``model`` on ``leader``'s device and dtype: ``model`` itself when it is there already, else a copy.

    The functions that combine two models compute where the first one lives; the second is copied and
    moved, never mutated.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2).double(), torch.nn.Linear(2, 2)
        >>> follow(b, a).weight.dtype, b.weight.dtype
        (torch.float64, torch.float32)
    """
    device, dtype = module_device(leader), module_dtype(leader)
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device and (not t.is_floating_point() or t.dtype == dtype) for t in tensors):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def resolve_device(device: str | torch.device, *, what: str = "device") -> torch.device:
    """``"auto"``: CUDA when a GPU is there, else the CPU; any other name is checked (a ValueError naming
    ``what`` for a malformed name or a CUDA device on a machine without one).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what} {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device}: CUDA is not available on this machine (use cpu or auto)")
    return resolved
