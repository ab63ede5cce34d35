"""The input shape a subcommand evaluates at, said out loud, and a random example batch of it.

The shape is ``--input-shape``; else the model's own ``example_input_array``; else, when data is used, the data's own image size with the stem's channels
(MNIST: 28 x 28; evaluating at an architecture's 224 x 224 default costs 64 times the compute for the same
images); else the architecture's default (timm's ``pretrained_cfg``, 224 x 224 for torchvision, a model's
``example_input_array``). Each subcommand prints the shape it chose and where it came from.

Example:
    >>> import argparse, torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    >>> args = argparse.Namespace(input_shape=None, arch="m:f", data="mnist")
    >>> input_shape_and_source(args, model)
    ((3, 28, 28), "MNIST's own size, 3 channels from the stem")
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rebasin_callbacks.commands.architectures import default_input_shape, stem_channels
from rebasin_callbacks.commands.errors import CommandError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = [
    "input_shape",
    "input_shape_and_source",
    "describe_shape",
    "example_input",
    "model_dtype",
    "DATA_SIZES",
]

#: The image size of each ``--data`` choice.
DATA_SIZES = {"mnist": (28, 28), "digits": (8, 8)}
_DATA_NAMES = {"mnist": "MNIST's", "digits": "the digits'"}


def input_shape(args: argparse.Namespace, model: nn.Module) -> tuple[int, ...]:
    """The input shape (see :func:`input_shape_and_source`)."""
    return input_shape_and_source(args, model)[0]


def input_shape_and_source(args: argparse.Namespace, model: nn.Module) -> tuple[tuple[int, ...], str]:
    """``(shape, where it came from)``: ``--input-shape``, the data's size, or the model's default.

    Raises:
        CommandError: no shape is known (the message says what to pass).
    """
    if args.input_shape:
        return tuple(args.input_shape), "--input-shape"
    data = getattr(args, "data", "none")
    default = default_input_shape(model, args.arch)
    if getattr(model, "example_input_array", None) is not None and default is not None:
        return default, "the model's example_input_array"
    if data in DATA_SIZES:
        channels = stem_channels(model)
        if channels is not None:
            return (
                channels,
                *DATA_SIZES[data],
            ), f"{_DATA_NAMES[data]} own size, {channels} channel{'s' * (channels != 1)} from the stem"
        if default is None:
            return (1, *DATA_SIZES[data]), f"{_DATA_NAMES[data]} own size"
    if default is None:
        raise CommandError(
            f"--arch {args.arch}: the input shape is unknown: pass --input-shape (e.g. 784 or 3 32 32)"
        )
    return default, f"the default of {args.arch}"


def describe_shape(shape: Sequence[int], source: str) -> str:
    """``"input [3, 28, 28] (MNIST's own size...; --input-shape to change)"``."""
    hint = "" if source == "--input-shape" else "; --input-shape to change"
    return f"input {list(shape)} ({source}{hint})"


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 when it has none)."""
    import torch

    return next((t.dtype for t in model.state_dict().values() if t.is_floating_point()), torch.float32)


def example_input(model: nn.Module, arch: str, shape: Sequence[int], batch: int = 2) -> Tensor:
    """A random batch of ``batch`` inputs of ``shape``, on the model's device and in its dtype.

    Raises:
        CommandError: the model does not accept that shape (the message names it, and the channels its stem
            wants when they differ).
    """
    import torch

    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device, model_dtype(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # any shape error, whatever layer raises it
        channels = stem_channels(model)
        if channels is not None and len(shape) == 3 and shape[0] != channels:
            hint = f"use --input-shape {channels} {shape[1]} {shape[2]} (the stem takes {channels} channels)"
        else:
            hint = "pass --input-shape"
        raise CommandError(
            f"--arch {arch} does not accept inputs of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}; {hint}"
        ) from None
    finally:
        model.train(was_training)
    return x
