"""Read model weights from modules, state dicts and checkpoint files, framework-free.

A checkpoint file is read with ``torch.load(..., weights_only=True)`` (no arbitrary code runs). Accepted
layouts: a plain ``torch.save(model.state_dict())``, a Lightning ``.ckpt`` (its ``"state_dict"`` entry,
keys prefixed by the LightningModule's attribute names), and the common ``{"model": ...}`` /
``{"model_state_dict": ...}`` / ``{"state_dict_ema": ...}`` dictionaries. :func:`match_reference`
re-keys such a state dict to a model's own names (prefixes such as ``"model."`` or DDP's ``"module."`` are
found automatically) and checks every shape, so a wrong architecture fails with the first offending key.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    >>> ckpt = {"state_dict": {"model." + k: v for k, v in net.state_dict().items()}}  # Lightning layout
    >>> sorted(match_reference(load_reference_state(ckpt), net))
    ['0.bias', '0.weight']
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from rebasin_callbacks.io import atomic_torch_save
from rebasin_callbacks.spec import SpecMismatchError

__all__ = [
    "describe_unreadable",
    "ReferenceLike",
    "load_reference_state",
    "match_reference",
    "AmbiguousReferenceError",
    "save_state_dict",
    "CHECKPOINT_KEYS",
]

#: What a reference can be: a module, a state dict, or a path to a checkpoint file.
ReferenceLike = Union[str, os.PathLike, nn.Module, Mapping[str, Tensor]]  # noqa: UP007 (a runtime alias)

#: Entries of a checkpoint dictionary that hold the weights, tried in this order.
CHECKPOINT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "state_dict_ema", "module")


def _unwrap(obj: Any) -> Any:
    """The weights inside a checkpoint dictionary (Lightning, plain training loops, timm), else ``obj``."""
    if not isinstance(obj, Mapping):
        return obj
    for key in CHECKPOINT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return inner
    return obj


#: terminal colour codes, which torch puts in its unpickling errors
ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def describe_unreadable(path: str, reason: str) -> str:
    """One plain line for a checkpoint ``torch.load(weights_only=True)`` refused, from its message.

    Example:
        >>> describe_unreadable("a.pt", "Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not ...")
        "a.pt is a whole pickled model (torch.nn.modules.linear.Linear), not a state dict: it is not unpickled because that could run code; save its weights with torch.save(model.state_dict(), 'a.pt') and pass that file"
    """
    reason = ANSI_ESCAPES.sub("", reason)
    found = _GLOBAL.search(reason)
    if found:
        name = found.group(1)
        what = "a whole pickled model" if name.startswith("torch.nn.") or "model" in name.lower() else (
            "a pickled object")  # fmt: skip
        return (
            f"{path} is {what} ({name}), not a state dict: it is not unpickled because that could run code; "
            f"save its weights with torch.save(model.state_dict(), {path!r}) and pass that file"
        )
    first = next((line.strip() for line in reason.splitlines() if line.strip()), reason.strip())
    return f"{path} is not a readable torch checkpoint ({first})"


def load_reference_state(reference: ReferenceLike, *, parameter: str = "reference") -> dict[str, Tensor]:
    """The reference's state dict: from a module, a state dict, or a checkpoint file.

    Files are read with ``torch.load(..., map_location="cpu", weights_only=True)``. The weights of a
    Lightning checkpoint (``"state_dict"``) or of a ``{"model": ...}``-style dictionary are taken as they are:
    their keys keep any prefix (see :func:`match_reference`).

    Raises:
        FileNotFoundError: the path is not a file (the message names it).
        ValueError: the file cannot be read with ``weights_only=True`` or holds no state dict.
        TypeError: ``reference`` is none of the accepted kinds.

    Example:
        >>> import torch
        >>> sd = load_reference_state(torch.nn.Linear(2, 3))
        >>> sorted(sd)
        ['bias', 'weight']
    """
    source = (
        f"{parameter}={os.fspath(reference)!r}" if isinstance(reference, (str, os.PathLike)) else parameter
    )
    if isinstance(reference, nn.Module):
        return {k: v.detach() for k, v in reference.state_dict().items()}
    if isinstance(reference, Mapping):
        obj: Any = reference
    elif isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such checkpoint file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors have many types
            raise ValueError(f"{source}: {describe_unreadable(str(path), str(exc))}") from exc
    else:
        raise TypeError(
            f"{parameter} must be an nn.Module, a state dict or a checkpoint path, got {type(reference).__name__}"
        )
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source}: not a state dict (got {type(obj).__name__})")
    bad = next((k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))), None)
    if bad is not None:
        raise ValueError(
            f"{source}: not a state dict: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor"
        )
    return dict(obj)


class AmbiguousReferenceError(SpecMismatchError):
    """A checkpoint holds several submodules that fit the model (``model.*`` and ``ema_model.*``).

    ``candidates`` lists their prefixes (without the trailing dot); choose one with ``prefix_hint=``
    (``submodule=`` of the Lightning callbacks, ``--submodule`` of the ``rebasin`` command)."""

    def __init__(self, message: str, candidates: list[str]):
        super().__init__(message)
        self.candidates = candidates


def _key_maps(
    reference: Mapping[str, Tensor], keys: list[str], prefix_hint: str | None
) -> list[tuple[str, str]]:
    """Candidate key maps ``(add, strip)``: reference key = ``add + key[len(strip):]``."""
    maps: list[tuple[str, str]] = [("", "")]
    if prefix_hint:
        maps.append((prefix_hint.rstrip(".") + ".", ""))
    if keys:
        first = keys[0]
        maps += [(r[: -len(first)], "") for r in reference if r.endswith("." + first)]
        maps += [("", first[: -len(r)]) for r in reference if first.endswith("." + r)]
    return list(dict.fromkeys(maps))


def _rekey(key: str, add: str, strip: str) -> str:
    return add + key[len(strip) :] if key.startswith(strip) else "\0" + key  # "\0": never in a reference


def _scope(reference: Mapping[str, Tensor], add: str) -> list[str]:
    """The reference keys a key map claims: all of them, or those under its prefix."""
    return [r for r in reference if r.startswith(add)]


#: the key segment ``torch.compile``'s ``OptimizedModule`` adds in front of the wrapped module's keys
_COMPILED = "_orig_mod."


def match_reference(
    reference: Mapping[str, Tensor],
    model: nn.Module,
    *,
    prefix_hint: str | None = None,
    parameter: str = "reference",
    model_name: str | None = None,
) -> dict[str, Tensor]:
    """``reference`` re-keyed to ``model``'s state_dict names, checked entry by entry, as strict loading does.

    The reference may carry a prefix on every key (a Lightning checkpoint of the whole LightningModule
    when only its ``model`` submodule is aligned: ``"model.0.weight"`` for ``"0.weight"``), or lack one the
    model has; the prefix is found automatically. Entries outside the chosen prefix are ignored (a
    LightningModule's loss weights); inside it, every entry must be one of the model's.

    Args:
        reference: the state dict to match (e.g. from :func:`load_reference_state`).
        model: the module whose names and shapes the result must have.
        prefix_hint: the submodule to take when the reference holds several that fit (``"ema_model"``).
        parameter: how messages call the reference (e.g. ``"checkpoint a.pt"``).
        model_name: how messages call the model (default: its class name).

    Raises:
        AmbiguousReferenceError: several submodules of the reference fit and ``prefix_hint`` picks none.
        SpecMismatchError: a model key the reference lacks, a differing shape (both named), a reference entry
            the model does not have (the first few named: another architecture), or an integer tensor where
            the model has floating-point weights.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 3)
        >>> ref = {"module." + k: torch.zeros_like(v) for k, v in net.state_dict().items()}  # DDP prefix
        >>> float(match_reference(ref, net)["weight"].abs().sum())
        0.0
    """
    target = model.state_dict()
    keys = list(target)
    model_name = model_name or type(model).__name__
    if not any(_COMPILED in k for k in keys):  # a checkpoint of a torch.compile'd module fits the plain one
        reference = {k.replace(_COMPILED, ""): v for k, v in reference.items()}
    maps = _key_maps(reference, keys, prefix_hint)
    full = [m for m in maps if all(_rekey(k, *m) in reference for k in keys)]
    if not full:
        best = max(maps, key=lambda m: sum(_rekey(k, *m) in reference for k in keys))
        missing = next(k for k in keys if _rekey(k, *best) not in reference)
        raise SpecMismatchError(
            f"{parameter} does not match {model_name}: it has no entry "
            f"{_rekey(missing, *best).lstrip(chr(0))!r} ({model_name} has {missing!r} "
            f"{tuple(target[missing].shape)}); its keys look like {list(reference)[:3]}"
        )
    hint = (prefix_hint.rstrip(".") + ".", "") if prefix_hint else None
    if hint in full:
        key_map = hint
    elif ("", "") in full:
        key_map = ("", "")
    elif len({a for a, _ in full}) > 1 and all(s == "" for _, s in full):
        names = [a.rstrip(".") for a, _ in full]
        raise AmbiguousReferenceError(
            f"{parameter} holds {len(names)} submodules that fit {model_name}: "
            + ", ".join(f"{n}.*" for n in names)
            + "; choose one (--submodule NAME on the command line, prefix_hint= / submodule= in Python)",
            names,
        )
    else:
        key_map = full[0]
    wanted = {_rekey(k, *key_map): k for k in keys}
    extra = [r for r in _scope(reference, key_map[0]) if r not in wanted]
    if extra:
        raise SpecMismatchError(
            f"{parameter} does not match {model_name}: it has {len(extra)} entries {model_name} does not "
            f"have, e.g. {extra[:3]} (another architecture or size?)"
        )
    out = {}
    for r, k in wanted.items():
        ref, own = reference[r], target[k]
        if tuple(ref.shape) != tuple(own.shape):
            raise SpecMismatchError(
                f"{parameter}: {r!r} has shape {tuple(ref.shape)}; {model_name} expects "
                + (f"{tuple(own.shape)}" if r == k else f"{tuple(own.shape)} for {k!r}")
            )
        if own.is_floating_point() and not (ref.is_floating_point() or ref.is_complex()):
            raise SpecMismatchError(
                f"{parameter} has {r!r} of dtype {ref.dtype}, but {model_name}'s {k!r} is {own.dtype}: "
                "integer weights are not a trained model's (truncated or quantised?)"
            )
        out[k] = ref
    return out


def save_state_dict(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Save a model's state dict (CPU tensors) so ``torch.load(path, weights_only=True)`` reads it back.

    The write is atomic: a failure leaves a previous file at ``path`` intact and no partial file.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = save_state_dict(torch.nn.Linear(2, 3), os.path.join(d, "w.pt"))
        ...     sorted(torch.load(p, weights_only=True))
        ['bias', 'weight']
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, path)
