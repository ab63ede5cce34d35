"""Checkpoints read into models of ``--arch``: strictly (``weights_only=True``), in their own dtype, finite.

A file that is not a state dict gets one line saying what it is (a whole pickled model: save its
``state_dict()`` instead); ``--submodule`` must name a prefix the checkpoint has; NaN or infinite weights are
refused with the key; each floating-point entry keeps the checkpoint's dtype (a float64 or bfloat16
checkpoint is aligned and saved as such).

The one-line description of an unreadable file is the library's own
(:func:`rebasin_callbacks.checkpoints.describe_unreadable`), imported where a checkpoint is read so that argument
errors are reported before torch is imported.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rebasin_callbacks.commands.architectures import build_model, infer_arch_options
from rebasin_callbacks.commands.devices import resolve_device
from rebasin_callbacks.commands.errors import EXIT_MISMATCH, EXIT_USAGE, CommandError, say

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "read_checkpoint",
    "load_checkpoint",
    "load_models",
    "check_finite_state",
    "check_submodule",
    "submodule_of",
    "model_prefixes",
]


def read_checkpoint(path: str, what: str) -> dict[str, Tensor]:
    from rebasin_callbacks.checkpoints import ANSI_ESCAPES, describe_unreadable, load_reference_state

    try:
        return load_reference_state(path, parameter=what)
    except FileNotFoundError:
        raise CommandError(f"{what}: no such file: {path}") from None
    except ValueError as exc:
        cause = exc.__cause__
        if cause is not None:  # torch.load's own error: raw, with terminal colours and Python-only advice
            raise CommandError(
                f"{what}: {describe_unreadable(path, str(cause) or type(cause).__name__)}"
            ) from None
        raise CommandError(ANSI_ESCAPES.sub("", str(exc))) from None


def check_finite_state(state: Mapping[str, Tensor], what: str, path: str) -> None:
    """Refuse NaN or infinite floating-point entries, naming the first key and how many values.

    Raises:
        CommandError: exit status 2.
    """
    import torch

    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CommandError(
                    f"{what} {path}: entry {key!r} {tuple(value.shape)} holds {bad} non-finite value(s) "
                    "(NaN or inf): its barrier and alignment would mean nothing; nothing was done",
                    EXIT_USAGE,
                )


def submodule_of(args: argparse.Namespace, what: str) -> tuple[str | None, str]:
    """``(submodule, flag)`` for MODEL_A or MODEL_B: ``--submodule``, or ``--submodule-b`` for B when given."""
    own = getattr(args, "submodule_b", None)
    if what == "MODEL_B" and own is not None:
        return own or None, "--submodule-b"
    return getattr(args, "submodule", None), "--submodule"


def model_prefixes(state: Mapping[str, Tensor], model_keys: list[str]) -> dict[str, int]:
    """The key prefixes under which ``state`` holds entries of the model (``""``: none), with their counts.

    Example:
        >>> model_prefixes({"model.0.weight": 0, "ema.0.weight": 0, "epoch": 0}, ["0.weight"])
        {'model': 1, 'ema': 1}
    """
    found: dict[str, int] = {}
    own = set(model_keys)
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in own:
                prefix = ".".join(parts[:i])
                found[prefix] = found.get(prefix, 0) + 1
                break
    return found


def check_submodule(state: Mapping[str, Tensor], submodule: str | None, what: str, path: str,
                    flag: str, model_keys: list[str]) -> None:  # fmt: skip
    """``--submodule NAME`` must be a prefix under which the checkpoint holds entries of the model; the
    error lists the prefixes it does hold them under."""
    if not submodule:
        return
    prefix = submodule.rstrip(".")
    found = model_prefixes(state, model_keys)
    if prefix in found:
        return
    listed = ", ".join(
        f"{p}.* ({n} entries)" if p else f"{n} entries without a prefix" for p, n in found.items()
    )
    hint = "; choose MODEL_B's with --submodule-b" if what == "MODEL_B" and flag == "--submodule" else ""
    raise CommandError(
        f"{flag} {submodule}: {what} {path} has no entry of the model under {prefix}.*; it holds "
        f"{listed or 'none of its entries'}{hint}"
    )


def _arch_name(args: argparse.Namespace) -> str:
    extra = [f"{k}={getattr(args, k)}" for k in ("num_classes", "in_chans") if getattr(args, k, None)]
    return f"architecture {args.arch}" + (f" ({', '.join(extra)})" if extra else "")


def _keep_dtypes(model: nn.Module, matched: Mapping[str, Tensor]) -> None:
    """Give each floating-point parameter and buffer the dtype of its checkpoint entry (tied ones once)."""
    tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for key, value in matched.items():
        own = tensors.get(key)
        if (
            own is not None
            and own.is_floating_point()
            and value.is_floating_point()
            and own.dtype != value.dtype
        ):
            own.data = own.data.to(value.dtype)


def load_checkpoint(model: nn.Module, state: Mapping[str, Tensor], args: argparse.Namespace, path: str,
                     what: str) -> None:  # fmt: skip
    from rebasin_callbacks.checkpoints import AmbiguousReferenceError, match_reference
    from rebasin_callbacks.spec import SpecMismatchError

    submodule, flag = submodule_of(args, what)
    check_submodule(state, submodule, what, path, flag, list(model.state_dict()))
    try:
        matched = match_reference(state, model, prefix_hint=submodule,
                                  parameter=f"checkpoint {path} ({what})", model_name=_arch_name(args))  # fmt: skip
    except AmbiguousReferenceError as exc:
        names = ", ".join(f"{c}.*" for c in exc.candidates)
        raise CommandError(
            f"checkpoint {path} ({what}) holds {len(exc.candidates)} models that fit {_arch_name(args)} "
            f"({names}); choose one with --submodule (e.g. --submodule {exc.candidates[0]})",
            EXIT_MISMATCH,
        ) from None
    except SpecMismatchError as exc:
        raise CommandError(str(exc), EXIT_MISMATCH) from None
    _keep_dtypes(model, matched)
    model.load_state_dict(matched)


def _infer_options(args: argparse.Namespace, state: Mapping[str, Tensor]) -> None:
    """``--num-classes`` / ``--in-chans`` not given: read from MODEL_A and printed (``args`` updated)."""
    found, notes = infer_arch_options(args.arch, state, submodule=getattr(args, "submodule", None))
    notes = [n for n in notes if getattr(args, n.split("=")[0], None) is None]
    for name, value in found.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if notes:
        say(f"read from {args.model_a}: " + ", ".join(notes) + " (override with --num-classes / --in-chans)")


def load_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """Models A and B: ``--arch`` built twice, the checkpoints loaded, on ``--device``, in eval mode.

    For ``timm:`` / ``torchvision:`` architectures, ``--num-classes`` and ``--in-chans`` default to what
    MODEL_A holds (printed); ``args`` is updated with the values used.

    Raises:
        CommandError: an unreadable or non-finite checkpoint, an absent ``--submodule`` (exit status 2), or
            a checkpoint that does not fit the architecture (3).
    """
    device = resolve_device(args.device)
    sides = (("MODEL_A", args.model_a), ("MODEL_B", args.model_b))
    states = [read_checkpoint(path, what) for what, path in sides]
    if args.num_classes is None or getattr(args, "in_chans", None) is None:
        _infer_options(args, states[0])
    models = []
    for (what, path), state in zip(sides, states):
        model = build_model(args.arch, args.num_classes, getattr(args, "in_chans", None))
        load_checkpoint(model, state, args, path, what)
        check_finite_state(model.state_dict(), what, path)
        models.append(model.to(device).eval())
    return models[0], models[1]
