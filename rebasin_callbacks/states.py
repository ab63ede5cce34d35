"""State dicts: the one compatibility check, finiteness, the L2 distance, and the one interpolation."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from rebasin_callbacks.spec import SpecMismatchError

__all__ = ["check_compatible", "check_finite", "check_lambda", "l2_distance", "interpolate_state_dict"]


def _state(x: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return x.state_dict() if isinstance(x, nn.Module) else x


def check_compatible(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    *,
    names: tuple[str, str] = ("the model", "the reference"),
) -> None:
    """Raise :class:`~rebasin_callbacks.SpecMismatchError` at the first entry where ``a`` and ``b`` differ.

    Same keys (a key missing on either side is named) and same shapes (the key, the first differing axis
    and both shapes are named). Devices and dtypes may differ: the functions that combine two models move
    and cast the second to the first. ``names`` says what ``a`` and ``b`` are in the message.

    Example:
        >>> import torch
        >>> check_compatible(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3))  # same architecture: no error
        >>> try:
        ...     check_compatible(torch.nn.Linear(2, 3), torch.nn.Linear(2, 4))
        ... except ValueError as err:
        ...     print(err)
        'weight' axis 0 has size 3 in the model but 4 in the reference (shapes (3, 2) vs (4, 2))
    """
    sa, sb = _state(a), _state(b)
    na, nb = names
    missing_b = [k for k in sa if k not in sb]
    missing_a = [k for k in sb if k not in sa]
    if missing_b or missing_a:
        key = (missing_b or missing_a)[0]
        has, lacks = (na, nb) if missing_b else (nb, na)
        shape = tuple((sa if missing_b else sb)[key].shape)
        raise SpecMismatchError(
            f"different architectures: {has} has {key!r} {shape} but {lacks} does not "
            f"({len(missing_b)} keys only in {na}, {len(missing_a)} only in {nb})"
        )
    for key, ta in sa.items():
        shape_a, shape_b = tuple(ta.shape), tuple(sb[key].shape)
        if shape_a == shape_b:
            continue
        if len(shape_a) != len(shape_b):
            raise SpecMismatchError(
                f"{key!r} has {len(shape_a)} axes in {na} but {len(shape_b)} in {nb} "
                f"(shapes {shape_a} vs {shape_b})"
            )
        axis = next(i for i, (x, y) in enumerate(zip(shape_a, shape_b)) if x != y)
        raise SpecMismatchError(
            f"{key!r} axis {axis} has size {shape_a[axis]} in {na} but {shape_b[axis]} in {nb} "
            f"(shapes {shape_a} vs {shape_b})"
        )


def check_finite(state: nn.Module | Mapping[str, Tensor], name: str = "the model") -> None:
    """Raise a ValueError naming the first floating-point entry of ``state`` that holds NaN or inf.

    Example:
        >>> import torch
        >>> try:
        ...     check_finite({"w": torch.tensor([1.0, float("nan")])}, "the reference")
        ... except ValueError as err:
        ...     print(err)
        the reference: 'w' holds 1 NaN/inf value(s) of 2
    """
    for key, t in _state(state).items():
        if t.is_floating_point() or t.is_complex():
            if bool(torch.isfinite(t.detach()).all()):  # one read-back per tensor when all is well
                continue
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                raise ValueError(f"{name}: {key!r} holds {bad} NaN/inf value(s) of {t.numel()}")


def l2_distance(a: nn.Module | Mapping[str, Tensor], b: nn.Module | Mapping[str, Tensor]) -> float:
    """Euclidean distance between two models' weights: ``sqrt(sum ||a[k] - b[k]||^2)``.

    Which entries count: for modules, their **floating-point parameters** only (not buffers: BatchNorm
    running statistics are not weights that re-basin aligns); for state dicts, every floating-point entry
    given (pass ``dict(model.named_parameters())`` to get the parameters-only figure). Integer entries are
    skipped. Summed in float64 on ``a``'s device (``b`` is copied there), whatever the dtypes.

    Example:
        >>> import torch
        >>> l2_distance({"w": torch.zeros(2), "n": torch.tensor(3)}, {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(1)})
        5.0
    """
    if isinstance(a, nn.Module) != isinstance(b, nn.Module):
        raise TypeError("l2_distance: pass two modules or two state dicts, not one of each")
    sa = dict(a.named_parameters()) if isinstance(a, nn.Module) else a
    sb = dict(b.named_parameters()) if isinstance(b, nn.Module) else b
    total: Tensor | None = None
    for key, ta in sa.items():
        if not ta.is_floating_point():
            continue
        if key not in sb:
            raise SpecMismatchError(f"l2_distance: {key!r} is in the first model but not the second")
        diff = ta.detach().double() - sb[key].detach().to(ta.device, torch.float64)
        term = diff.pow(2).sum()
        total = term if total is None else total + term
    return 0.0 if total is None else math.sqrt(float(total))  # one host sync, at the end


def check_lambda(lam: float) -> float:
    """``lam`` as a finite float (a point on the line between two models), else an error naming it.

    Example:
        >>> check_lambda(1)
        1.0
    """
    try:
        value = float(lam)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"lam must be a number, got {type(lam).__name__}") from exc
    if not math.isfinite(value):
        raise ValueError(f"lam must be finite, got {lam}")
    return value


def interpolate_state_dict(
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    lam: float | Tensor,
    *,
    differentiable: bool = False,
) -> dict[str, Tensor]:
    """``(1 - lam) * a + lam * b`` for every floating-point entry; other entries are copied from ``a``.

    The result follows ``a``: its device and dtype (``b`` is moved and cast; half precision is
    interpolated in float32). ``lam = 0`` and ``lam = 1`` give ``a`` and ``b`` exactly, even where the
    other end holds inf or NaN. ``lam`` outside ``[0, 1]`` extrapolates. Inputs are not modified. Keys and
    shapes must match (:func:`check_compatible`, the first mismatch named). ``differentiable=True`` keeps
    ``a``'s autograd graph (and a tensor ``lam``'s): the costs on the line between a permuted view and its
    reference are trained through it; ``b`` is always treated as a constant.

    Example:
        >>> import torch
        >>> interpolate_state_dict({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"].tolist()
        [0.25, 0.25]
    """
    if not (differentiable and isinstance(lam, Tensor)):
        lam = check_lambda(lam)  # type: ignore[arg-type]
    try:
        check_compatible(state_a, state_b, names=("model_a", "model_b"))
    except SpecMismatchError as err:
        raise SpecMismatchError(f"interpolate: {err}") from None
    out = {}
    for key, ta in state_a.items():
        if not differentiable:
            ta = ta.detach()
        if not (ta.is_floating_point() or ta.is_complex()):
            out[key] = ta.detach().clone()  # counters such as num_batches_tracked: keep a's
            continue
        work = ta.float() if ta.dtype in (torch.float16, torch.bfloat16) else ta
        other = state_b[key].detach().to(device=work.device, dtype=work.dtype)
        out[key] = _lerp(work, other, lam).to(ta.dtype)
    return out


def _lerp(a: Tensor, b: Tensor, lam: float | Tensor) -> Tensor:
    # The endpoints are the endpoints themselves: 0 * inf is NaN, so the formula would not give them.
    if isinstance(lam, float) and lam == 0.0:
        return a.clone()
    if isinstance(lam, float) and lam == 1.0:
        return b.clone()
    # (1 - lam) * a + lam * b (not a + lam * (b - a)): closer to each end near it
    return (1.0 - lam) * a + lam * b
