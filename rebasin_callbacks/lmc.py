"""Linear mode connectivity: interpolation, loss/accuracy barrier and AUC, BN-statistics reset, REPAIR.

The straight line between two models with the same architecture is
``theta(lam) = (1 - lam) * theta_A + lam * theta_B``. For a cost ``C`` (a loss: lower is better) the
barrier and area under the curve of the supplement of Peña et al. (CVPR 2023) are

* Eq. 2: ``B = sup_lam  C(theta(lam)) - [(1 - lam) C(theta_A) + lam C(theta_B)]``
* Eq. 3: ``AUC = integral_0^1  C(theta(lam)) - [(1 - lam) C(theta_A) + lam C(theta_B)] dlam``

measured on a grid of ``lam`` (the AUC by the trapezoid rule). For a metric where higher is better
(accuracy) the gap is taken the other way round, ``chord - value``, so a positive barrier is always a drop
in quality. The gap is zero at both ends, so a barrier is never negative; an AUC can be.

Interpolating two networks collapses the variance of their hidden activations (Jordan et al., 2022,
"REPAIR"): :func:`reset_bn_stats` and :func:`repair` (defined in :mod:`rebasin_callbacks.bn`, re-exported
here) fix the statistics of an interpolated network; :func:`lmc_curve` applies them at every point.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> result = lmc_curve(a, b, [(x, y)], n_points=5, progress=False, label="naive")
    >>> len(result.values["loss"]), result.barrier >= 0
    (5, True)
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rebasin_callbacks.batches import split_batch, take_batches, to_device
from rebasin_callbacks.bn import (
    bn_modules,
    collect_statistics,
    repair,
    repair_points,
    repair_with_statistics,
    reset_bn_stats,
    reset_bn_stats_on,
)
from rebasin_callbacks.devices import follow, module_device, module_dtype
from rebasin_callbacks.modes import eval_mode
from rebasin_callbacks.plotting import plot_lmc
from rebasin_callbacks.spec import SpecMismatchError
from rebasin_callbacks.states import check_compatible, check_finite, check_lambda, interpolate_state_dict
from rebasin_callbacks.threads import thread_limit

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = [
    "interpolate",
    "interpolate_state_dict",
    "LMCResult",
    "lmc_curve",
    "barrier_and_auc",
    "evaluate_model",
    "Evaluator",
    "reset_bn_stats",
    "repair",
    "plot_lmc",
]

#: Metric names for which higher is better (their barrier is the drop below the chord).
HIGHER_IS_BETTER: tuple[str, ...] = ("accuracy", "acc", "top1", "top5", "top1_accuracy", "top5_accuracy")

Evaluate = (
    Callable[[nn.Module], Any] | tuple[Iterable[Any], Callable[[Tensor, Tensor], Tensor]] | Iterable[Any]
)


# --------------------------------------------------------------------------------------------- interpolation
def _check_compatible(
    sa: Mapping[str, Tensor],
    sb: Mapping[str, Tensor],
    names: tuple[str, str] = ("model_a", "model_b"),
    what: str = "interpolate",
) -> None:
    try:
        check_compatible(sa, sb, names=names)
    except SpecMismatchError as err:
        raise SpecMismatchError(f"{what}: {err}") from None


def interpolate(model_a: nn.Module, model_b: nn.Module, lam: float) -> nn.Module:
    """A new model (a deep copy of ``model_a``) with weights ``(1 - lam) * a + lam * b``.

    Parameters and floating-point buffers (BatchNorm running statistics) are interpolated; integer buffers
    such as ``num_batches_tracked`` are copied from ``model_a``. Neither input is modified. ``lam`` outside
    ``[0, 1]`` extrapolates. The models must have the same state-dict keys and shapes (the first mismatch is
    named in the error); they may live on different devices or dtypes: the result follows ``model_a``
    (``model_b``'s weights are copied over, cast and moved).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> mid = interpolate(a, b, 0.5)
        >>> torch.allclose(mid.weight, (a.weight + b.weight) / 2)
        True
    """
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"interpolate: {name} must be an nn.Module, got {type(m).__name__}")
    if type(model_a) is not type(model_b):
        raise ValueError(
            f"interpolate: the models have different classes: {type(model_a).__name__} vs {type(model_b).__name__}"
        )
    state = interpolate_state_dict(model_a.state_dict(), model_b.state_dict(), lam)
    out = copy.deepcopy(model_a)
    with torch.no_grad():
        for key, value in out.state_dict().items():
            value.copy_(state[key])  # state_dict tensors share storage with the module's
    return out


# --------------------------------------------------------------------------------------------- barrier / AUC
def _gap(lambdas: Sequence[float], values: Sequence[float], higher_is_better: bool) -> list[float]:
    v0, v1 = values[0], values[-1]
    l0, l1 = lambdas[0], lambdas[-1]
    out = []
    for lam, v in zip(lambdas, values):
        t = (lam - l0) / (l1 - l0)
        chord = (1.0 - t) * v0 + t * v1
        out.append(chord - v if higher_is_better else v - chord)
    return out


def barrier_and_auc(
    lambdas: Sequence[float], values: Sequence[float], *, higher_is_better: bool = False
) -> tuple[float, float]:
    """Barrier (Eq. 2: largest gap above the chord of the endpoints) and AUC (Eq. 3: trapezoid of the gap).

    ``lambdas`` must be increasing and start and end at the endpoints (usually 0 and 1). With
    ``higher_is_better`` (accuracy) the gap is ``chord - value``. A non-finite value gives NaN for both.

    Example:
        >>> barrier_and_auc([0.0, 0.5, 1.0], [1.0, 3.0, 1.0])
        (2.0, 1.0)
        >>> [round(v, 6) for v in barrier_and_auc([0.0, 0.5, 1.0], [0.9, 0.5, 0.9], higher_is_better=True)]
        [0.4, 0.2]
    """
    lam = [float(x) for x in lambdas]
    val = [float(x) for x in values]
    if len(lam) != len(val):
        raise ValueError(f"lambdas and values differ in length: {len(lam)} vs {len(val)}")
    if len(lam) < 2:
        raise ValueError(f"need at least 2 points on the curve, got {len(lam)}")
    if any(b <= a for a, b in zip(lam, lam[1:])):
        raise ValueError(f"lambdas must be strictly increasing, got {lam}")
    if not all(math.isfinite(v) for v in val):
        return math.nan, math.nan
    gap = _gap(lam, val, higher_is_better)
    barrier = max(gap)
    auc = sum(0.5 * (g0 + g1) * (l1 - l0) for g0, g1, l0, l1 in zip(gap, gap[1:], lam, lam[1:]))
    return barrier, auc


@dataclass
class LMCResult:
    """Loss / accuracy along the line between two models and their barriers and AUCs.

    Attributes:
        lambdas: interpolation coefficients (0 is model A, 1 is model B).
        values: metric name -> value at each lambda (``"loss"``, and ``"accuracy"`` when available).
        barrier: barrier (Eq. 2) of ``"loss"`` (or of the first metric when there is no loss).
        auc: AUC (Eq. 3) of the same metric.
        barriers: barrier of every metric; for accuracy it is the drop below the chord (positive = worse).
        aucs: AUC of every metric, same sign convention.
        label: a name for tables and plot legends (e.g. ``"naive"``, ``"sinkhorn l2"``).
        nonfinite: metric -> lambdas at which the evaluation returned NaN or inf (their barrier is NaN).
    """

    lambdas: list[float]
    values: dict[str, list[float]]
    barrier: float
    auc: float
    barriers: dict[str, float]
    aucs: dict[str, float]
    label: str = ""
    nonfinite: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_values(
        cls,
        lambdas: Sequence[float],
        values: Mapping[str, Sequence[float]],
        *,
        label: str = "",
        higher_is_better: Iterable[str] = HIGHER_IS_BETTER,
    ) -> LMCResult:
        """Build a result (barriers and AUCs included) from measured values."""
        if not values:
            raise ValueError("LMCResult needs at least one metric")
        better = set(higher_is_better)
        lam = [float(x) for x in lambdas]
        vals = {k: [float(x) for x in v] for k, v in values.items()}
        barriers, aucs, nonfinite = {}, {}, {}
        for name, v in vals.items():
            barriers[name], aucs[name] = barrier_and_auc(lam, v, higher_is_better=name in better)
            bad = [lm for lm, x in zip(lam, v) if not math.isfinite(x)]
            if bad:
                nonfinite[name] = bad
        main = "loss" if "loss" in vals else next(iter(vals))
        return cls(lam, vals, barriers[main], aucs[main], barriers, aucs, label, nonfinite)

    def summary(self) -> str:
        """One line: ``label: loss barrier ..., AUC ...; accuracy barrier ...``."""
        parts = [f"{k} barrier {self.barriers[k]:.4g}, AUC {self.aucs[k]:.4g}" for k in self.values]
        bad = f" (non-finite at {self.nonfinite})" if self.nonfinite else ""
        return f"{self.label or 'lmc'}: " + "; ".join(parts) + bad

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for JSON / loggers)."""
        return {
            "label": self.label,
            "lambdas": list(self.lambdas),
            "values": {k: list(v) for k, v in self.values.items()},
            "barrier": self.barrier,
            "auc": self.auc,
            "barriers": dict(self.barriers),
            "aucs": dict(self.aucs),
            "nonfinite": {k: list(v) for k, v in self.nonfinite.items()},
        }

    def plot(self, ax: Axes | None = None, metric: str = "loss", **kwargs: Any) -> Axes:
        """Draw ``metric`` against lambda on ``ax`` (a new figure's axes when None)."""
        from rebasin_callbacks.plotting import plot_curve

        return plot_curve(self, ax=ax, metric=metric, **kwargs)


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    max_batches: int | None = None,
    reduce: Callable[..., Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss (and accuracy for ``[N, C]`` logits with integer targets) of ``model`` over ``data``.

    ``data`` yields batches that :func:`~rebasin_callbacks.utils.split_batch` understands (``(inputs,
    targets)`` pairs, or dicts such as ``{"image": x, "label": y}``); they are moved to the model's device
    and floating-point inputs cast to its dtype. ``loss_fn`` (default cross-entropy) must return the batch
    mean; batches are weighted by their size. Totals stay on the device (one host sync at the end);
    ``reduce(totals, reduce_op="sum")`` (e.g. a Lightning strategy's ``reduce``) sums them over processes
    that each hold a shard. The model runs in eval mode; every submodule's mode is restored afterwards.
    Accuracy is NaN when an output is NaN or inf (an argmax over NaN logits is no prediction), so a broken
    model never reports an accuracy that looks fine.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Linear(3, 2)
        >>> sorted(evaluate_model(m, [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]))
        ['accuracy', 'loss']
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    device, dtype = module_device(model), module_dtype(model)
    # loss sum, count, correct, count (acc), non-finite outputs
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    with eval_mode(model):
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(to_device(batch, device, dtype))
            if y is None:
                raise ValueError(
                    "evaluate_model: batches must hold targets ((inputs, targets) pairs or a dict with a "
                    f"target key), got a batch of {type(batch).__name__} without one"
                )
            out = model(x)
            n = y.shape[0] if y.dim() > 0 else 1
            totals[0] += loss_fn(out, y).detach().double() * n
            totals[1] += n
            if out.dim() == 2 and out.is_floating_point() and not y.is_floating_point() and y.dim() == 1:
                totals[2] += (out.argmax(dim=1) == y).sum().double()
                totals[3] += n
                totals[4] += (~torch.isfinite(out)).sum().double()
    if reduce is not None:
        totals = reduce(totals, reduce_op="sum")
    loss_sum, n_loss, correct, n_acc, n_bad = (float(v) for v in totals.tolist())
    if n_loss == 0:
        raise ValueError("evaluate_model: the data yielded no batches")
    result = {"loss": loss_sum / n_loss}
    if n_acc == n_loss:
        result["accuracy"] = math.nan if n_bad else correct / n_acc
    return result


class Evaluator:
    """``model -> {"loss": mean loss, "accuracy": fraction}`` over ``data``: :func:`evaluate_model` as a
    callable, for :func:`lmc_curve`'s ``evaluate``.

    ``max_batches`` bounds every evaluation (needed for an endless iterable); ``reduce`` (e.g. a Lightning
    strategy's ``reduce``) sums the totals over processes that each hold a shard.

    Example:
        >>> import torch
        >>> batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> metrics = Evaluator(batches)(torch.nn.Linear(4, 3))
        >>> sorted(metrics)
        ['accuracy', 'loss']
    """

    def __init__(
        self,
        data: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        max_batches: int | None = None,
        reduce: Callable[..., Tensor] | None = None,
    ):
        self.data, self.loss_fn, self.max_batches, self.reduce = data, loss_fn, max_batches, reduce

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate_model(
            model, self.data, self.loss_fn, max_batches=self.max_batches, reduce=self.reduce
        )


def _as_metrics(value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out[str(k)] = float(v.detach().float().item() if isinstance(v, Tensor) else v)
        if not out:
            raise ValueError("evaluate returned an empty mapping")
        return out
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"evaluate returned a tensor of shape {tuple(value.shape)}; expected a scalar")
        return {"loss": float(value.detach().float().item())}
    if isinstance(value, (int, float)):
        return {"loss": float(value)}
    raise TypeError(
        f"evaluate must return a float or a mapping of metric -> float, got {type(value).__name__}"
    )


def _make_evaluator(
    evaluate: Evaluate,
) -> tuple[Callable[[nn.Module], dict[str, float]], Iterable[Any] | None]:
    """The evaluation function and, when there is one, its data (the fallback data for reset_bn / repair)."""
    if (
        isinstance(evaluate, tuple)
        and len(evaluate) == 2
        and callable(evaluate[1])
        and not callable(evaluate[0])
    ):
        data, loss_fn = evaluate
        return (lambda m: evaluate_model(m, data, loss_fn)), data
    if callable(evaluate) and not isinstance(evaluate, nn.Module):
        fn = evaluate
        return (lambda m: _as_metrics(fn(m))), None
    if isinstance(evaluate, Iterable) and not isinstance(evaluate, (str, bytes, nn.Module)):
        data = evaluate
        return (lambda m: evaluate_model(m, data)), data
    raise TypeError(
        "evaluate must be a callable model -> loss or dict, a (dataloader, loss_fn) pair or a dataloader, "
        f"got {type(evaluate).__name__}"
    )


# --------------------------------------------------------------------------------------------- the curve
def _progress(items: Sequence[float], enabled: bool, label: str) -> Iterable[float]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return items
    return tqdm(items, desc=f"LMC {label}".strip(), leave=False)


def _lambdas(n_points: int, lambdas: Sequence[float] | None) -> list[float]:
    """The curve's points: ``n_points`` evenly spaced ones, or the given ``lambdas`` checked."""
    if lambdas is None:
        if n_points < 2:
            raise ValueError(f"n_points must be >= 2, got {n_points}")
        return [i / (n_points - 1) for i in range(n_points)]
    lams = [check_lambda(x) for x in lambdas]
    if len(lams) < 2 or any(b <= a for a, b in zip(lams, lams[1:])):
        raise ValueError(f"lambdas must be at least 2 strictly increasing values, got {lams}")
    return lams


def _bn_batches(
    model: nn.Module, reset_bn: bool, repair: bool, source: Any, n_batches: int | None
) -> list[Any]:
    """The batches BatchNorm statistics are reset / repaired on (none when neither is asked for), on the
    model's device and dtype."""
    if not (reset_bn or repair):
        return []
    if source is None:
        what = "reset_bn=True" if reset_bn else "repair=True"
        raise ValueError(f"lmc_curve: {what} needs bn_data (evaluate is a callable, so it has no data)")
    batches = take_batches(source, n_batches, module_device(model), "lmc_curve", dtype=module_dtype(model))
    if reset_bn and not bn_modules(model):
        warnings.warn(
            "lmc_curve: reset_bn=True but the model has no BatchNorm layer",
            RuntimeWarning,
            stacklevel=3,  # lmc_curve's caller
        )
    return batches


def lmc_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    evaluate: Evaluate,
    *,
    n_points: int = 11,
    lambdas: Sequence[float] | None = None,
    reset_bn: bool = False,
    repair: bool = False,
    bn_data: Iterable[Any] | None = None,
    n_batches: int | None = 10,
    progress: bool = True,
    label: str = "",
    on_nan: Literal["warn", "raise", "ignore"] = "warn",
    higher_is_better: Iterable[str] = HIGHER_IS_BETTER,
    threads: int | str | None = "auto",
) -> LMCResult:
    """Evaluate the models on the straight line between ``model_a`` and ``model_b``; barrier and AUC.

    Args:
        model_a, model_b: same architecture (neither is modified). The computation follows ``model_a``
            (its device and dtype); ``model_b`` is copied there when it lives elsewhere. A NaN or inf
            weight or buffer is refused (``ValueError`` naming the model and the key).
        evaluate: a callable ``model -> loss`` or ``model -> {"loss": ..., "accuracy": ...}``; or a
            ``(dataloader, loss_fn)`` pair or a bare dataloader (cross-entropy), then accuracy is reported
            for ``[N, C]`` logits. The model it receives is in eval mode.
        n_points: evenly spaced lambdas in ``[0, 1]`` (ignored when ``lambdas`` is given).
        lambdas: explicit increasing interpolation coefficients (first and last are the endpoints of the
            chord in Eq. 2 / 3).
        reset_bn: recompute BatchNorm statistics of every point's model on ``bn_data``
            (:func:`reset_bn_stats`); endpoints included, so the chord is that of the reset endpoints.
        repair: apply :func:`repair` at every lambda (after ``reset_bn`` when both are set).
        bn_data: batches for ``reset_bn`` / ``repair`` (training batches, as the literature does); defaults
            to the evaluation data.
        n_batches: how many batches of ``bn_data`` those use.
        progress: show a tqdm bar over the points (when tqdm is installed).
        label: stored on the result (tables, legends).
        on_nan: a NaN or inf from ``evaluate`` is recorded in ``result.nonfinite`` and makes that metric's
            barrier and AUC NaN; ``"warn"`` also warns, ``"raise"`` raises a ValueError at once.
        higher_is_better: metric names whose barrier is the drop below the chord.
        threads: CPU intra-op threads for torch during the curve (:func:`~rebasin_callbacks.utils.thread_limit`:
            ``"auto"`` = ``$REBASIN_NUM_THREADS`` or a small cap that keeps a busy machine fast; an int;
            ``None`` = torch's own setting). Restored afterwards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> res = lmc_curve(a, b, lambda m: float(m.weight.norm()), n_points=3, progress=False)
        >>> res.lambdas
        [0.0, 0.5, 1.0]
    """
    if on_nan not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_nan must be 'warn', 'raise' or 'ignore', got {on_nan!r}")
    lams = _lambdas(n_points, lambdas)
    evaluator, eval_data = _make_evaluator(evaluate)
    _check_compatible(model_a.state_dict(), model_b.state_dict())
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        check_finite(model, f"lmc_curve: {name}")  # a NaN weight would give a curve of NaN, or a fake 0.0
    model_b = follow(model_b, model_a)  # computation follows model_a; model_b is copied, never mutated

    with thread_limit(threads):  # many small kernels: see utils.thread_limit
        batches = _bn_batches(
            model_a, reset_bn, repair, bn_data if bn_data is not None else eval_data, n_batches
        )
        if repair:
            points = repair_points(model_a, split_batch(batches[0])[0])
            stats_a = collect_statistics(model_a, points, batches)
            stats_b = collect_statistics(model_b, points, batches)

        values: dict[str, list[float]] = {}
        for i, lam in enumerate(_progress(lams, progress, label)):
            model = interpolate(model_a, model_b, lam)
            if reset_bn:
                reset_bn_stats_on(model, batches)
            if repair:
                repair_with_statistics(model, lam, points, stats_a, stats_b, batches, 1e-6)
            model.eval()
            with torch.no_grad():
                metrics = evaluator(model)
            if i == 0:
                values = {k: [] for k in metrics}
            elif set(metrics) != set(values):
                raise ValueError(
                    f"evaluate returned metrics {sorted(metrics)} at lam={lam} but {sorted(values)} before"
                )
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad and on_nan == "raise":
                raise ValueError(
                    f"lmc_curve: evaluate returned non-finite {bad} at lam={lam} ({label or 'lmc'})"
                )
            for k, v in metrics.items():
                values[k].append(v)

    result = LMCResult.from_values(lams, values, label=label, higher_is_better=higher_is_better)
    if result.nonfinite and on_nan == "warn":
        warnings.warn(
            f"lmc_curve ({label or 'lmc'}): evaluate returned NaN/inf for {result.nonfinite}; "
            "their barriers and AUCs are NaN",
            RuntimeWarning,
            stacklevel=2,
        )
    return result
