"""Plots of linear-mode-connectivity curves (matplotlib is imported only when a plot is drawn).

The style follows Fig. 2 of Peña et al. (CVPR 2023): the naive path dashed gray, re-based paths solid,
weight matching dashed blue. The style is picked from each curve's label.

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


__all__ = ["plot_lmc", "plot_curve", "curve_style"]

_SOLID_COLORS = ("tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")
_AXIS_NAMES = {"loss": "loss", "accuracy": "accuracy"}


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
    **kwargs: Any,
) -> Axes:
    """Draw one metric of one curve on ``ax`` (a new figure's axes when None); returns the axes."""
    if metric not in result.values:
        raise KeyError(f"metric {metric!r} not in this curve (it has {sorted(result.values)})")
    ax = _new_axes() if ax is None else ax
    name = result.label if label is None else label
    style = {**curve_style(name, index), "marker": "o", "markersize": 3, **kwargs}
    barrier = result.barriers.get(metric, float("nan"))
    ax.plot(result.lambdas, result.values[metric], label=f"{name or 'curve'} (B={barrier:.3g})", **style)
    ax.set_xlabel(r"$\lambda$")
    ax.set_ylabel(_AXIS_NAMES.get(metric, metric))
    return ax


def plot_lmc(
    curves: Mapping[str, LMCResult] | Sequence[LMCResult],
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """One panel per metric (loss, accuracy) with every curve; saves a PNG when ``path`` is given.

    ``curves`` is a sequence of results (their ``label`` is the legend) or a mapping label -> result.
    Metrics no curve has are skipped. Legends show each curve's barrier. The figure is built without pyplot,
    so it works on headless machines and does not touch the global backend.

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
    fig = Figure(figsize=(4.5 * len(present), 3.6), layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, metric in zip(axes, present):
        solid = 0
        for label, curve in items:
            if metric not in curve.values:
                continue
            plot_curve(curve, ax, metric, label=label, index=solid)
            if curve_style(label)["linestyle"] == "-":
                solid += 1
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
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
