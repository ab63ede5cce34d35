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
    """:func:`rebasin_callbacks.devices.resolve_device` for ``--device``, its errors as a one-line CommandError.

    Raises:
        CommandError: not a device name, or CUDA asked for on a machine without it.
    """
    from rebasin_callbacks.devices import resolve_device as resolve

    try:
        return resolve(name, what="--device")
    except ValueError as exc:
        raise CommandError(str(exc)) from None
