"""Every file a subcommand reads or writes, checked before any work and before torch is imported.

Inputs (the checkpoints, ``--spec``, a ``file.py`` in ``--arch``, ``--data-root``) must exist and be
readable; outputs must not be an input or another output, a directory, or in a folder that cannot be written
(:func:`rebasin_callbacks.io.check_output_paths`).

Example:
    >>> import argparse
    >>> check_inputs(argparse.Namespace(model_a="missing.pt", model_b="b.pt", arch="timm:resnet18"))
    Traceback (most recent call last):
    ...
    rebasin_callbacks.commands.errors.CommandError: MODEL_A: no such file: missing.pt
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from rebasin_callbacks.commands.errors import CommandError
from rebasin_callbacks.io import OutputPathError, check_output_paths

__all__ = ["input_files", "check_inputs", "check_outputs"]


def _arch_file(arch: str | None) -> str | None:
    module = (arch or "").rpartition(":")[0]
    return module if module.endswith(".py") or os.sep in module else None


def input_files(args: argparse.Namespace) -> dict[str, str | None]:
    """The files a subcommand reads, by the name messages give them."""
    return {
        "MODEL_A": getattr(args, "model_a", None),
        "MODEL_B": getattr(args, "model_b", None),
        "--spec": getattr(args, "spec", None),
        "--arch": _arch_file(getattr(args, "arch", None)),
    }


def check_inputs(args: argparse.Namespace) -> None:
    """Every input file exists, is a file and can be read; ``--data-root`` is a folder when given.

    Raises:
        CommandError: the first one that is not (exit status 2), named with its option.
    """
    for name, path in input_files(args).items():
        if path is None:
            continue
        p = Path(path)
        if not p.exists():
            raise CommandError(f"{name}: no such file: {path}")
        if not p.is_file():
            raise CommandError(f"{name}: {path} is not a file")
        if not os.access(p, os.R_OK):
            raise CommandError(f"{name}: {path} cannot be read (permission denied)")
    root = getattr(args, "data_root", None)
    if root is not None and not Path(root).is_dir() and not getattr(args, "download", False):
        raise CommandError(f"--data-root: no such folder: {root}")


def check_outputs(args: argparse.Namespace, outputs: Mapping[str, str | None]) -> None:
    """Check the output paths before any work (see :func:`rebasin_callbacks.io.check_output_paths`).

    Raises:
        CommandError: an output is an input or another output, a directory, or not writable.
    """
    try:
        check_output_paths(outputs, input_files(args))
    except OutputPathError as exc:
        raise CommandError(str(exc)) from None
