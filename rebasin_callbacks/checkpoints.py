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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from rebasin_callbacks.spec import SpecMismatchError

__all__ = [
    "ReferenceLike",
    "load_reference_state",
    "match_reference",
    "load_weights",
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
            raise ValueError(f"{source}: torch.load(weights_only=True) cannot read it: {exc}") from exc
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


def match_reference(
    reference: Mapping[str, Tensor],
    model: nn.Module,
    *,
    prefix_hint: str | None = None,
    parameter: str = "reference",
) -> dict[str, Tensor]:
    """``reference`` re-keyed to ``model``'s state_dict names, checked entry by entry.

    The reference may carry a prefix on every key (a Lightning checkpoint of the whole LightningModule
    when only its ``model`` submodule is aligned: ``"model.0.weight"`` for ``"0.weight"``), or lack one the
    model has; the prefix is found automatically (``prefix_hint`` is tried first). Entries the model does
    not have are ignored (a LightningModule's loss weights, an EMA copy).

    Raises:
        SpecMismatchError: the first model key the reference lacks, or the first differing shape (both
            shapes named).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 3)
        >>> ref = {"module." + k: torch.zeros_like(v) for k, v in net.state_dict().items()}  # DDP prefix
        >>> float(match_reference(ref, net)["weight"].abs().sum())
        0.0
    """
    target = model.state_dict()
    keys = list(target)
    # key maps (add, strip): reference key = add + key (checkpoint of a wrapper), or key = strip + reference
    # key (the whole LightningModule aligned to a bare copy of its only child)
    maps: list[tuple[str, str]] = [("", "")]
    if prefix_hint:
        maps.append((prefix_hint + ".", ""))
    if keys:
        first = keys[0]
        maps += [(r[: -len(first)], "") for r in reference if r.endswith("." + first)]
        maps += [("", first[: -len(r)]) for r in reference if first.endswith("." + r)]

    def rekey(key: str, add: str, strip: str) -> str:
        return add + key[len(strip) :] if key.startswith(strip) else "\0" + key  # "\0": never in reference

    key_map = next(((a, s) for a, s in maps if all(rekey(k, a, s) in reference for k in keys)), None)
    if key_map is None:
        best = max(maps, key=lambda m: sum(rekey(k, *m) in reference for k in keys))
        missing = next(k for k in keys if rekey(k, *best) not in reference)
        raise SpecMismatchError(
            f"{parameter} does not match {type(model).__name__}: it has no entry {rekey(missing, *best).lstrip(chr(0))!r} "
            f"(the model's {missing!r} has shape {tuple(target[missing].shape)}); reference keys look like "
            f"{list(reference)[:3]}"
        )
    out = {}
    for k in keys:
        ref, own = reference[rekey(k, *key_map)], target[k]
        if tuple(ref.shape) != tuple(own.shape):
            raise SpecMismatchError(
                f"{parameter} does not match {type(model).__name__}: {rekey(k, *key_map)!r} has shape "
                f"{tuple(ref.shape)} in the reference but {k!r} has shape {tuple(own.shape)} in the model"
            )
        out[k] = ref
    return out


def load_weights(
    model: nn.Module, source: ReferenceLike, *, prefix_hint: str | None = None, parameter: str = "checkpoint"
) -> nn.Module:
    """Load ``source`` (module, state dict or checkpoint path) into ``model`` in place; returns ``model``.

    Tensors are copied to each entry's device and dtype, so a CPU checkpoint loads into a CUDA model.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
        >>> torch.equal(load_weights(b, a).weight, a.weight)
        True
    """
    state = load_reference_state(source, parameter=parameter)
    state = match_reference(state, model, prefix_hint=prefix_hint, parameter=parameter)
    model.load_state_dict(state)
    return model


def save_state_dict(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Save a model's state dict (CPU tensors) so ``torch.load(path, weights_only=True)`` reads it back.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = save_state_dict(torch.nn.Linear(2, 3), os.path.join(d, "w.pt"))
        ...     sorted(torch.load(p, weights_only=True))
        ['bias', 'weight']
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
    return path
