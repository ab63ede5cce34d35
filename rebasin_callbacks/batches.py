"""Batches: moving them to a device, splitting them into inputs and targets, taking the first few, and
inputs a model declares it takes (for tracing a spec when none is given)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from rebasin_callbacks.devices import module_device, module_dtype

__all__ = ["INPUT_KEYS", "TARGET_KEYS", "to_device", "split_batch", "take_batches", "infer_example_inputs"]

#: dict keys recognised as a batch's inputs and targets by :func:`split_batch` (first match wins)
INPUT_KEYS: tuple[str, ...] = ("inputs", "input", "x", "image", "images", "pixel_values", "features", "data")
TARGET_KEYS: tuple[str, ...] = ("targets", "target", "y", "label", "labels")


def to_device(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``batch`` with every tensor moved to ``device``, inside (nested) tuples, lists, dicts and namedtuples.

    With ``dtype``, floating-point tensors are also cast to it (integer targets keep their dtype). Other
    objects are returned as they are; the input containers are not modified.

    Example:
        >>> import torch
        >>> out = to_device((torch.ones(2), {"y": torch.tensor([1])}), "cpu", dtype=torch.float64)
        >>> out[0].dtype, out[1]["y"].dtype
        (torch.float64, torch.int64)
    """
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    if isinstance(batch, Mapping):
        items = {k: to_device(v, device, dtype) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:  # a Mapping type that cannot be built from a dict
            return items
    return batch


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch; ``targets`` is ``None`` when the batch has none.

    Accepted: a tensor (inputs only); a tuple/list ``(inputs, targets, ...)`` (extra items ignored); a
    mapping with an input key (one of :data:`INPUT_KEYS`, e.g. ``"x"``, ``"image"``) and optionally a target
    key (:data:`TARGET_KEYS`, e.g. ``"y"``, ``"label"``).

    Example:
        >>> import torch
        >>> x, y = split_batch({"image": torch.zeros(2, 3), "label": torch.tensor([0, 1])})
        >>> tuple(x.shape), y.tolist()
        ((2, 3), [0, 1])
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        x_key = next((k for k in INPUT_KEYS if k in batch), None)
        y_key = next((k for k in TARGET_KEYS if k in batch), None)
        if x_key is None:
            raise TypeError(
                f"a dict batch needs an input key (one of {list(INPUT_KEYS)}); got keys {list(batch)[:8]}. "
                "Pass a callable evaluate / a dataloader yielding (inputs, targets) for other formats"
            )
        return batch[x_key], (batch[y_key] if y_key is not None else None)
    raise TypeError(
        f"a batch must be a tensor, an (inputs, targets) tuple/list or a dict with input/target keys, got "
        f"{type(batch).__name__}"
    )


def take_batches(
    data: Iterable[Any] | Tensor,
    n: int | None,
    device: torch.device | str,
    what: str = "data",
    *,
    dtype: torch.dtype | None = None,
) -> list[Any]:
    """The first ``n`` batches of ``data`` (all when ``None``), moved to ``device`` (and float ``dtype``).

    A bare tensor is one batch. Raises a ValueError naming ``what`` when ``n < 1`` or no batch comes.

    Example:
        >>> import torch
        >>> len(take_batches([torch.ones(2)] * 5, 3, "cpu"))
        3
    """
    if isinstance(data, Tensor):
        data = [data]
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"{what}: the number of batches must be an int >= 1 or None, got {n!r}")
    out = []
    for i, batch in enumerate(data):
        if n is not None and i >= n:
            break
        out.append(to_device(batch, device, dtype))
    if not out:
        raise ValueError(f"{what}: the data yielded no batches")
    return out


def infer_example_inputs(model: nn.Module, batch: int = 2) -> tuple[Tensor, str] | None:
    """Random inputs the model declares it takes, for tracing a spec when the user gave none, and a
    sentence saying where they came from; ``None`` when the model does not say.

    Two sources, both stated by the model itself: timm's ``pretrained_cfg["input_size"]`` (``(C, H, W)``),
    and a first layer that is an ``nn.Linear`` (its ``in_features``). A convolutional stem gives the
    channels but not the image size, so it is not guessed.

    Example:
        >>> import torch
        >>> x, why = infer_example_inputs(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU()))
        >>> tuple(x.shape), why
        ((2, 5), "the first layer's in_features (5)")
    """
    device, dtype = module_device(model), module_dtype(model)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and size and all(isinstance(v, int) and v > 0 for v in size):
        x = torch.randn(batch, *size, device=device, dtype=dtype)
        return x, f"timm's pretrained_cfg input_size {tuple(size)}"
    first = next(
        (m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters())), None
    )
    if isinstance(first, nn.Linear):
        x = torch.randn(batch, first.in_features, device=device, dtype=dtype)
        return x, f"the first layer's in_features ({first.in_features})"
    return None
