"""Plots of linear-mode-connectivity curves (matplotlib is imported only when a plot is drawn).

The style follows Fig. 2 of Peña et al. (CVPR 2023): the naive path dashed gray, re-based paths solid,
weight matching dashed blue (picked from each curve's label). Conventions: lambda runs from model A (0) to
model B (1) on every figure, the y axes name the quantity and the data split (``split="MNIST test"``), each
legend entry gives its curve's barrier (``naive (barrier 0.562)``), and the legend sits outside the axes,
below them, so it never covers a curve.

Example:
    >>> from rebasin_callbacks.lmc import LMCResult
    >>> naive = LMCResult.from_values([0, 0.5, 1], {"loss": [0.1, 2.0, 0.1]}, label="naive")
    >>> fig = plot_lmc([naive], metrics=("loss",))
    >>> len(fig.axes)
    1
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class LMCResult(Protocol):
    """What a plot reads of a curve (:class:`rebasin_callbacks.lmc.LMCResult` has it): plotting stays a
    leaf module that imports nothing of the package."""

    lambdas: list[float]
    values: dict[str, list[float]]
    barriers: dict[str, float]
    label: str


__all__ = ["plot_lmc", "plot_curve", "curve_style", "axis_label", "LAMBDA_LABEL"]

_SOLID_COLORS = ("tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")
_AXIS_NAMES = {"loss": "loss (cross-entropy)", "accuracy": "accuracy"}
#: The x axis of every LMC figure: the interpolation weight, from model A to model B.
LAMBDA_LABEL = r"$\lambda$  (0 = model A, 1 = model B)"


def axis_label(metric: str, split: str | None = None) -> str:
    """The y-axis label of a metric: quantity and split.

    Example:
        >>> axis_label("loss", "MNIST test")
        'MNIST test loss (cross-entropy)'
    """
    name = _AXIS_NAMES.get(metric, metric)
    return f"{split} {name}" if split else name


def curve_style(label: str, index: int = 0) -> dict[str, Any]:
    """Line style for a curve: naive dashed gray, weight matching dashed blue, anything else solid."""
    low = label.lower()
    if "naive" in low:
        return {"color": "0.5", "linestyle": "--"}
    if "weight" in low or low.startswith("wm") or " wm" in low:
        return {"color": "tab:blue", "linestyle": "--"}
    return {"color": _SOLID_COLORS[index % len(_SOLID_COLORS)], "linestyle": "-"}


def _new_axes() -> Axes:
    from matplotlib.figure import Figure

    return Figure(figsize=(4.5, 3.5)).add_subplot()


def plot_curve(
    result: LMCResult,
    ax: Axes | None = None,
    metric: str = "loss",
    *,
    label: str | None = None,
    index: int = 0,
    split: str | None = None,
    **kwargs: Any,
) -> Axes:
    """Draw one metric of one curve on ``ax`` (a new figure's axes when None); returns the axes.

    The legend label is ``"<label> (barrier 0.562)"``; ``split`` names the data on the y axis.
    """
    if metric not in result.values:
        raise KeyError(f"metric {metric!r} not in this curve (it has {sorted(result.values)})")
    ax = _new_axes() if ax is None else ax
    name = result.label if label is None else label
    style = {**curve_style(name, index), "marker": "o", "markersize": 3, **kwargs}
    barrier = result.barriers.get(metric, float("nan"))
    ax.plot(
        result.lambdas, result.values[metric], label=f"{name or 'curve'} (barrier {barrier:.3g})", **style
    )
    ax.set_xlabel(LAMBDA_LABEL)
    ax.set_ylabel(axis_label(metric, split))
    return ax


def plot_lmc(
    curves: Mapping[str, LMCResult] | Sequence[LMCResult],
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    split: str | None = None,
    dpi: int = 100,
) -> Figure:
    """One panel per metric (loss, accuracy) with every curve; saves a PNG when ``path`` is given.

    ``curves`` is a sequence of results (their ``label`` is the legend) or a mapping label -> result.
    Metrics no curve has are skipped. Each panel's legend, below it, gives each curve's barrier on that
    metric; ``split`` (e.g. ``"MNIST test"``) names the data on the y axes; without a ``title`` the figure is
    titled "linear mode connectivity, model A -> model B". The figure is built without pyplot, so it works
    on headless machines and does not touch the global backend.

    Example:
        >>> from rebasin_callbacks.lmc import LMCResult
        >>> a = LMCResult.from_values([0, 1], {"loss": [1.0, 1.0], "accuracy": [0.9, 0.9]}, label="naive")
        >>> len(plot_lmc({"naive": a}).axes)
        2
    """
    from matplotlib.figure import Figure

    items = list(curves.items()) if isinstance(curves, Mapping) else [(c.label, c) for c in curves]
    if not items:
        raise ValueError("plot_lmc: no curves given")
    present = [m for m in metrics if any(m in c.values for _, c in items)]
    if not present:
        have = sorted({k for _, c in items for k in c.values})
        raise ValueError(f"plot_lmc: none of the metrics {list(metrics)} is in the curves (they have {have})")
    fig = Figure(figsize=(4.8 * len(present), 4.2), layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, metric in zip(axes, present):
        solid = 0
        for label, curve in items:
            if metric not in curve.values:
                continue
            plot_curve(curve, ax, metric, label=label, index=solid, split=split)
            if curve_style(label)["linestyle"] == "-":
                solid += 1
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.02, 1.02)
        # below the axes: the dip (or bump) of a curve is mid-panel, where an inside legend lands
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.suptitle(title or "linear mode connectivity, model A -> model B")
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """``fig.savefig(path)``, atomically: a failed write leaves the previous file intact.

    The format comes from the file's suffix (PNG when it has none).
    """
    from rebasin_callbacks.io import atomic_write

    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
