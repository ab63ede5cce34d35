"""Figures as pixels, for loggers whose image API takes arrays (W&B, Neptune): :func:`figure_rgb`."""

from __future__ import annotations

from typing import Any

__all__ = ["figure_rgb"]


def figure_rgb(fig: Any) -> Any:
    """The matplotlib figure as an ``(H, W, 3)`` uint8 array (what every logger's ``log_image`` accepts).

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure_rgb(Figure(figsize=(2, 1), dpi=10)).shape
        (10, 20, 3)
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
