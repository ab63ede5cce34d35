"""The Sinkhorn relaxation's settings, declared once: :class:`SinkhornSettings`.

``ReBasin``, ``align``, ``ReBasinIncremental`` and the Avalanche plugin all relax permutations the same way
(learnable scores, ``sinkhorn(scores / tau)``), so they take one frozen, validated object instead of each
re-declaring ``tau``, ``n_iters``, ``tol``, ``init_scale``, ``init_noise`` and ``seed``. Their old keyword
arguments still work: they override the matching fields (:meth:`SinkhornSettings.merged`).

Example:
    >>> from rebasin_callbacks import SinkhornSettings
    >>> s = SinkhornSettings(tau=0.5)
    >>> s.merged(n_iters=50).n_iters, s.tau
    (50, 0.5)
    >>> SinkhornSettings(tau=0.0)
    Traceback (most recent call last):
    ...
    ValueError: tau must be a number in [0.001, 1000.0] or 'auto', got 0.0
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["SinkhornSettings", "TAU_RANGE", "check_tau"]

#: The one rule for a relaxation's temperature (on top of the per-size score scale). Below 1e-3 the scores
#: overflow float32 for any useful margin; above 1e3 every soft permutation is the uniform matrix.
TAU_RANGE: tuple[float, float] = (1e-3, 1e3)


def check_tau(tau: Any, *, allow_auto: bool = True) -> float | Literal["auto"]:
    """``tau`` if it is a finite number in :data:`TAU_RANGE` (or ``"auto"``), else a ValueError naming it.

    Example:
        >>> check_tau(2)
        2.0
    """
    if allow_auto and tau == "auto":
        return "auto"
    low, high = TAU_RANGE
    ok = isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau)
    if not (ok and low <= tau <= high):
        auto = " or 'auto'" if allow_auto else ""
        raise ValueError(f"tau must be a number in [{low}, {high}]{auto}, got {tau!r}")
    return float(tau)


def _check(name: str, ok: bool, want: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SinkhornSettings:
    """How permutations are relaxed: a frozen, validated record (invalid values fail at construction).

    One default per field. Two callers start elsewhere, each for a stated reason: :func:`~rebasin_callbacks.align`
    uses ``tau="auto"`` (the cost's preferred temperature) and ``init_scale="auto"`` (a margin adapted to
    each group size for the soft methods); :class:`~rebasin_callbacks.incremental.ReBasinIncremental` uses
    ``init_scale=10, init_noise=0`` (Procedure 1 starts every episode at the identity itself).

    Attributes:
        tau: Sinkhorn temperature, in :data:`TAU_RANGE`. ``"auto"`` is resolved by ``align`` from the cost
            (:attr:`~rebasin_callbacks.costs.CostHints.tau`); elsewhere it means 1.
        n_iters: Sinkhorn iterations per evaluation (``>= 1``).
        tol: marginal tolerance at which the iterations stop early (``>= 0``).
        init_scale: margin of the initial permutation in the scores, a finite number or ``"auto"``
            (:func:`~rebasin_callbacks.rebasin.auto_scale` per group size).
        init_noise: standard deviation of the Gaussian jitter added to the initial scores (``>= 0``).
        backward: the Sinkhorn gradient, ``"implicit"`` (the paper's) or ``"unrolled"``.
        seed: an int or a ``torch.Generator`` for the initial jitter (``None``: torch's global state).

    Example:
        >>> import torch
        >>> from rebasin_callbacks import ReBasin, SinkhornSettings
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> rb = ReBasin(mlp, example_inputs=torch.randn(4, 2), settings=SinkhornSettings(tau=0.5, seed=0))
        >>> rb.tau
        0.5
    """

    tau: float | Literal["auto"] = 1.0
    n_iters: int = 20
    tol: float = 1e-5
    init_scale: float | Literal["auto"] = 1.0
    init_noise: float = 0.1
    backward: Literal["implicit", "unrolled"] = "implicit"
    seed: int | torch.Generator | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", check_tau(self.tau))
        n = self.n_iters
        _check("n_iters", isinstance(n, int) and not isinstance(n, bool) and n >= 1, "an int >= 1", n)
        _check("tol", _is_number(self.tol) and self.tol >= 0, "a finite number >= 0", self.tol)
        s = self.init_scale
        _check("init_scale", s == "auto" or _is_number(s), "a finite number or 'auto'", s)
        _check(
            "init_noise",
            _is_number(self.init_noise) and self.init_noise >= 0,
            "a finite number >= 0",
            self.init_noise,
        )
        _check(
            "backward", self.backward in ("implicit", "unrolled"), "'implicit' or 'unrolled'", self.backward
        )
        seed = self.seed
        ok = (
            seed is None
            or isinstance(seed, torch.Generator)
            or (isinstance(seed, int) and not isinstance(seed, bool))
        )
        if not ok:
            raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")

    def merged(self, **overrides: Any) -> SinkhornSettings:
        """A copy with the given fields replaced; ``None`` values are ignored (an argument not passed).

        Example:
            >>> SinkhornSettings().merged(tau=None, n_iters=5).n_iters
            5
        """
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"SinkhornSettings has no field(s) {unknown}")
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def temperature(self) -> float:
        """``tau`` as a number (``"auto"`` is 1 where no cost prefers another)."""
        return 1.0 if self.tau == "auto" else float(self.tau)


def settings_from(
    settings: SinkhornSettings | None, default: SinkhornSettings, **overrides: Any
) -> SinkhornSettings:
    """``settings`` (or ``default``) with the keyword arguments a caller was given on top.

    Example:
        >>> settings_from(None, SinkhornSettings(init_noise=0.0), tau=2.0).init_noise
        0.0
    """
    if settings is not None and not isinstance(settings, SinkhornSettings):
        raise TypeError(f"settings must be a SinkhornSettings, got {type(settings).__name__}")
    return (settings if settings is not None else default).merged(**overrides)
