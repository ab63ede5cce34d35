"""``--device`` of every subcommand (and of ``rebasin demo``) resolved to a ``torch.device``.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rebasin_callbacks.commands.errors import CommandError

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; anything else is checked.

    Raises:
        CommandError: not a device name, or CUDA asked for on a machine without it.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CommandError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)"
        )
    return device
