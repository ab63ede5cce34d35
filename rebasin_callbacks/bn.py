"""BatchNorm-statistics reset and REPAIR: fix the activation statistics of an interpolated network.

Interpolating two networks collapses the variance of their hidden activations (Jordan et al., 2022,
"REPAIR: REnormalizing Permuted Activations for Interpolation Repair"). :func:`reset_bn_stats` recomputes
BatchNorm running statistics of an interpolated network on a few batches and :func:`repair` rescales each
unit so its pre-activation mean and standard deviation are the interpolation of the endpoints'.
:func:`~rebasin_callbacks.lmc_curve` calls both (``reset_bn=True`` / ``repair=True``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> _ = reset_bn_stats(net, [torch.randn(16, 3)])
    >>> int(net[1].num_batches_tracked)
    1
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from rebasin_callbacks.batches import split_batch, take_batches
from rebasin_callbacks.devices import follow, module_device, module_dtype
from rebasin_callbacks.modes import eval_mode
from rebasin_callbacks.spec import SpecMismatchError
from rebasin_callbacks.states import check_compatible, check_lambda

__all__ = [
    "reset_bn_stats",
    "repair",
    "bn_modules",
    "reset_bn_stats_on",
    "RepairPoint",
    "repair_points",
    "collect_statistics",
    "repair_with_statistics",
]


# --------------------------------------------------------------------------------------------- BN statistics
def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics (the ones a reset changes)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reset_bn_stats_on(model: nn.Module, batches: Sequence[Any]) -> nn.Module:
    """:func:`reset_bn_stats` on batches already taken and moved (a curve resets many points on the same)."""
    bns = bn_modules(model)
    if not bns:
        return model
    momenta = {bn: bn.momentum for bn in bns}
    with eval_mode(model):  # dropout & co stay off; only BatchNorm layers collect statistics
        try:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative moving average: every batch counts equally
                bn.train()
            for batch in batches:
                x, _ = split_batch(batch)
                model(x)
        finally:
            for bn, mom in momenta.items():
                bn.momentum = mom
    return model


def reset_bn_stats(
    model: nn.Module, data: Iterable[Any] | Tensor, *, n_batches: int | None = 10
) -> nn.Module:
    """Recompute every BatchNorm layer's running mean and variance on a few training batches (in place).

    Statistics are reset and re-estimated as the plain average over ``n_batches`` batches of ``data``
    (``momentum=None``); only BatchNorm layers run in train mode (dropout stays off), and every module's mode
    and momentum are restored. Needed after interpolation: the interpolated running statistics are not the
    statistics of the interpolated network. Returns ``model``; a model without BatchNorm is unchanged.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> _ = reset_bn_stats(m, [torch.randn(16, 3) for _ in range(2)])
        >>> int(m[1].num_batches_tracked)
        2
    """
    batches = take_batches(data, n_batches, module_device(model), "reset_bn_stats", dtype=module_dtype(model))
    return reset_bn_stats_on(model, batches)


# --------------------------------------------------------------------------------------------- REPAIR
class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass once the needed statistics are collected."""


def _channels_last(y: Tensor, kind: str) -> Tensor:
    # Linear: features are the last dim; conv and BatchNorm: channels are dim 1
    flat = y if kind == "linear" else y.movedim(1, -1)
    return flat.reshape(-1, flat.shape[-1]).double()


class _Stats:
    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None
        self.n = 0

    def add(self, y: Tensor) -> None:
        s, s2 = y.sum(0), (y * y).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = s2 if self.sumsq is None else self.sumsq + s2
        self.n += y.shape[0]

    def mean_std(self) -> tuple[Tensor, Tensor]:
        assert self.sum is not None and self.sumsq is not None
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean * mean).clamp_min(0.0)
        return mean, var.sqrt()


@dataclass
class RepairPoint:
    """A module whose output REPAIR renormalises (:func:`repair_points`)."""

    name: str  # module whose output is renormalised
    kind: Literal["linear", "conv", "bn"]


def repair_points(model: nn.Module, example: Any) -> list[RepairPoint]:
    """Repairable modules in execution order: each conv/linear, or the BatchNorm that directly follows it.

    A BatchNorm counts as following a layer when its input is that layer's output tensor (object identity),
    which is robust to module registration order. Layers whose output is the model's output (the
    classifier) and modules called more than once are left alone.
    """
    named = dict(model.named_modules())
    calls: list[tuple[str, str]] = []
    outputs: dict[str, Tensor] = {}
    bn_input: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def layer_hook(name: str, kind: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            if isinstance(out, Tensor):
                calls.append((name, kind))
                outputs[name] = out
                if kind == "bn" and inp and isinstance(inp[0], Tensor):
                    bn_input[name] = inp[0]

        return hook

    for name, m in named.items():
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, _ConvNd) and not m.transposed:
            kind = "conv"
        elif isinstance(m, _BatchNorm):
            kind = "bn"
        else:
            continue
        handles.append(m.register_forward_hook(layer_hook(name, kind)))
    try:
        with eval_mode(model), torch.no_grad():
            final = model(example)
    finally:
        for h in handles:
            h.remove()

    followed_by: dict[str, str] = {}
    for bn, x in bn_input.items():
        for name, kind in calls:
            if kind != "bn" and outputs.get(name) is x:
                followed_by[name] = bn
    points: list[RepairPoint] = []
    seen: set[str] = set()
    for name, kind in calls:
        if kind == "bn" or name in seen or counts.get(name, 0) != 1:
            continue
        seen.add(name)
        target = followed_by.get(name)
        out = outputs[target] if target is not None else outputs[name]
        if isinstance(final, Tensor) and out is final:
            continue
        if target is not None and counts.get(target, 0) == 1:
            points.append(RepairPoint(target, "bn"))
        elif target is None:
            points.append(RepairPoint(name, kind))  # type: ignore[arg-type]
    return points


@torch.no_grad()
def collect_statistics(
    model: nn.Module, points: Sequence[RepairPoint], batches: Sequence[Any], *, stop_after: str | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and std of each point's output over ``batches`` (eval mode); an endpoint's
    statistics are collected once and serve every point of a curve."""
    named = dict(model.named_modules())
    stats = {p.name: _Stats() for p in points}
    handles = []

    def make_hook(p: RepairPoint) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[Any, ...], out: Tensor) -> None:
            stats[p.name].add(_channels_last(out, p.kind))
            if p.name == stop_after:
                raise _StopForward

        return hook

    for p in points:
        handles.append(named[p.name].register_forward_hook(make_hook(p)))
    try:
        with eval_mode(model):
            for batch in batches:
                x, _ = split_batch(batch)
                try:
                    model(x)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {name: s.mean_std() for name, s in stats.items()}


@torch.no_grad()
def _renormalise(
    module: nn.Module,
    point: RepairPoint,
    mean: Tensor,
    std: Tensor,
    goal_mean: Tensor,
    goal_std: Tensor,
    eps: float,
) -> None:
    """Turn the point's output ``y`` into ``scale * (y - mean) + goal_mean`` with ``scale = goal_std / std``."""
    scale = torch.where(std > eps, goal_std / std.clamp_min(eps), torch.ones_like(std))
    if point.kind == "bn":
        if module.weight is None or module.bias is None:
            warnings.warn(
                f"repair: BatchNorm {point.name!r} has no affine parameters; it is left as is",
                RuntimeWarning,
                stacklevel=4,
            )
            return
    weight, bias = module.weight, module.bias
    assert isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
    w_shape = [-1] + [1] * (weight.dim() - 1)
    weight.mul_(scale.to(weight.dtype).view(w_shape))
    if bias is not None:
        bias.copy_(((bias.double() - mean) * scale + goal_mean).to(bias.dtype))
    else:
        warnings.warn(
            f"repair: {point.name!r} has no bias, so only its standard deviation is repaired (not its mean)",
            RuntimeWarning,
            stacklevel=4,
        )


def repair_with_statistics(
    interpolated: nn.Module,
    lam: float,
    points: Sequence[RepairPoint],
    stats_a: Mapping[str, tuple[Tensor, Tensor]],
    stats_b: Mapping[str, tuple[Tensor, Tensor]],
    batches: Sequence[Any],
    eps: float,
) -> nn.Module:
    """REPAIR with both endpoints' statistics already collected (:func:`collect_statistics`): each point of
    ``interpolated`` gets the interpolated mean and std, in execution order; modified in place."""
    named = dict(interpolated.named_modules())
    # one point at a time, in execution order: repairing a layer changes the statistics of every later one
    for p in points:
        mean, std = collect_statistics(interpolated, [p], batches, stop_after=p.name)[p.name]
        (ma, sa), (mb, sb) = stats_a[p.name], stats_b[p.name]
        goal_mean = (1.0 - lam) * ma + lam * mb
        goal_std = (1.0 - lam) * sa + lam * sb
        _renormalise(named[p.name], p, mean, std, goal_mean, goal_std, eps)
    return interpolated


def repair(
    model_a: nn.Module,
    model_b: nn.Module,
    interpolated: nn.Module,
    lam: float,
    data: Iterable[Any] | Tensor,
    *,
    n_batches: int | None = 10,
    eps: float = 1e-6,
) -> nn.Module:
    """REPAIR (Jordan et al., 2022): give every interpolated unit the interpolated endpoint statistics.

    For each convolution / linear layer (the classifier excepted), the pre-activation of every unit (the
    output of the BatchNorm right after the layer when there is one, else the layer's output) gets mean
    ``(1 - lam) * mu_A + lam * mu_B`` and standard deviation ``(1 - lam) * sigma_A + lam * sigma_B``
    over ``n_batches`` batches of ``data``, by rescaling and shifting the layer's weight and bias (or the
    BatchNorm's affine parameters). Layers are repaired in execution order, each measured after the earlier
    ones are fixed, so the match is exact on the data used. ``interpolated`` is modified in place and
    returned; statistics are taken in eval mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> from rebasin_callbacks.lmc import interpolate
        >>> mid = repair(a, b, interpolate(a, b, 0.5), 0.5, [torch.randn(64, 4)])
        >>> isinstance(mid, nn.Sequential)
        True
    """
    lam = check_lambda(lam)
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        try:
            check_compatible(model, interpolated, names=(name, "interpolated"))
        except SpecMismatchError as err:
            raise SpecMismatchError(f"repair: {err}") from None
    batches = take_batches(
        data, n_batches, module_device(interpolated), "repair", dtype=module_dtype(interpolated)
    )
    # statistics are taken where the interpolated model lives; the endpoints are copied there if needed
    model_a, model_b = follow(model_a, interpolated), follow(model_b, interpolated)
    points = repair_points(interpolated, split_batch(batches[0])[0])
    stats_a = collect_statistics(model_a, points, batches)
    stats_b = collect_statistics(model_b, points, batches)
    return repair_with_statistics(interpolated, lam, points, stats_a, stats_b, batches, eps)
