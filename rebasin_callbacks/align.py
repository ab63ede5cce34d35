"""The paper's method in one call: ``align(model, reference)`` finds permutations of ``model``'s hidden
units that bring it into ``reference``'s basin.

Three stages:

1. a warm start, by default :func:`~rebasin_callbacks.weight_matching` (fast, often already exact);
2. Sinkhorn refinement: learnable scores per permutation group (:class:`~rebasin_callbacks.ReBasin`),
   relaxed to doubly-stochastic matrices, trained with Adam on any differentiable cost (data-free L2,
   midpoint loss, ...) through the implicit Sinkhorn gradient;
3. after every step the scores are projected to hard permutations (the row-wise argmax where it is a
   permutation, a linear assignment otherwise) and the hard permutations are scored with the cost; the
   best one seen is returned, so the result is never worse than the warm start. The search stops early
   once nothing improves: after a weight-matching warm start, before it would spend more than the warm
   start's own time without a gain.

By default the relaxation is trained with a straight-through estimator (``method="ste"``: the hard
permutation in the forward pass, the Sinkhorn gradient in the backward pass), so the optimiser minimises
the cost of what is finally returned; the paper's soft relaxation (``"soft"``), a temperature annealed
towards permutations (``"anneal"``) and an entropy penalty (``"entropy"``) are options. Data-driven costs evaluate BatchNorm layers with batch statistics, so they work on
BatchNorm networks in eval mode.

The score scale and the learning rate adapt to each group size (see ``ReBasin(init_scale="auto")``): with
a fixed temperature, 512-wide layers sit at an almost uniform matrix and barely move for tens of steps.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rebasin_callbacks.costs import CosineCost, L2Cost, MidCost, RndCost, resolve_cost
from rebasin_callbacks.matching import L2Gradient, MatchingProblem
from rebasin_callbacks.permute import identity_permutations, perm_to_matrix, permute, random_permutations
from rebasin_callbacks.rebasin import PermutedView, ReBasin, apply_soft_permutations
from rebasin_callbacks.settings import SinkhornSettings, settings_from
from rebasin_callbacks.sinkhorn import SinkhornConvergenceWarning
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.spec_source import resolve_spec
from rebasin_callbacks.utils import (
    check_compatible,
    check_finite,
    infer_example_inputs,
    module_device,
    split_batch,
    thread_limit,
    to_device,
)

__all__ = ["align", "AlignResult", "ALIGN_START"]

#: align's relaxation: the cost chooses the temperature (0.5 for ``cost="mid"``, else 1) and the margin adapts
#: to the method (1 for ``"ste"``, per group size for the soft methods); the other fields are the defaults.
ALIGN_START = SinkhornSettings(tau="auto", init_scale="auto")

Init = Literal["weight_matching", "identity", "random"]
Method = Literal["ste", "soft", "anneal", "entropy"]
METHODS: tuple[str, ...] = ("ste", "soft", "anneal", "entropy")

# "anneal": tau_t = tau * max(_ANNEAL_FLOOR, _ANNEAL_RATE ** t); "entropy": penalty weight relative to
# the warm start's cost (a cost-scale-free weight).
_ANNEAL_RATE = 0.9
_ANNEAL_FLOOR = 0.01
_ENTROPY_WEIGHT = 0.1
# With polish, the fewest steps without a gain before the time budget may stop the refinement: on trained
# pairs the first better permutation comes at step 4 (benchmarks/quality.py).
_MIN_STALE = 4
# steps without a better hard permutation before the refinement stops (early_stopping="auto")
_PATIENCE, _PATIENCE_DATA = 30, 100
# Sinkhorn temperature of the midpoint cost (tau="auto"): sharper soft permutations than tau 1
_TAU_MID = 0.5
# A gain smaller than this (relative) is kept but does not extend the search.
_SIGNIFICANT = 1e-3
_POLISH_SWEEPS = 5


@dataclass
class AlignResult:
    """What :func:`align` found.

    Attributes:
        perms: ``{group: LongTensor}``, the best hard permutations (apply with :func:`permute`).
        model: a permuted deep copy of the input model (``pi_P(theta_A)``, close to the reference).
        spec: the permutation spec used.
        history: per step, ``"cost"`` (soft cost the optimizer saw), ``"hard_cost"`` (cost of the
            projected hard permutations), ``"best_cost"`` and ``"time"`` (seconds since the first step
            began, at the end of each step); ``"init_cost"`` holds the warm start's cost and
            ``"identity_cost"`` the cost of the model as it is (a candidate too) when the two differ.
        steps: optimisation steps run (0 when the warm start could not be improved on).
        seconds: wall-clock time of the whole call.
    """

    perms: dict[str, Tensor]
    model: nn.Module
    spec: PermutationSpec
    history: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    @property
    def cost(self) -> float:
        """The best hard cost found."""
        if self.history.get("best_cost"):
            return float(self.history["best_cost"][-1])
        start = self.history.get("init_cost", []) + self.history.get("identity_cost", [])
        return float(min(start)) if start else math.nan


class _Batches:
    """Cycles through ``data`` as long as needed. A one-shot iterator (a generator) cannot be iterated
    twice, so its batches are kept as they come and replayed once it is exhausted."""

    def __init__(self, data: Iterable[Any], device: torch.device):
        self.data, self.device = data, device
        self.one_shot = iter(data) is data
        self.seen: list[Any] = []
        self._it: Iterator[Any] = iter(data)
        self._replay: int | None = None

    def __next__(self) -> Any:
        if self._replay is not None:
            batch = self.seen[self._replay % len(self.seen)]
            self._replay += 1
            return batch
        try:
            raw = next(self._it)
        except StopIteration:
            if not self.seen:
                raise ValueError("data yielded no batches") from None
            if self.one_shot:
                self._replay = 1
                return self.seen[0]
            self._it = iter(self.data)
            try:
                raw = next(self._it)
            except StopIteration:
                raise ValueError(
                    "data yielded no batches on its second pass (pass a list or a DataLoader)"
                ) from None
        batch = _as_pair(raw, self.device)
        if self.one_shot or not self.seen:
            self.seen.append(batch)
        return batch


def _as_pair(batch: Any, device: torch.device) -> Any:
    """A batch on ``device``; a dict batch becomes ``(inputs, targets)`` (keys as :func:`split_batch`)."""
    if isinstance(batch, Mapping):
        try:
            batch = split_batch(batch)
        except TypeError as err:
            raise TypeError(f"data: {err}") from None
    return to_device(batch, device)


def _unwrap(module: Any, name: str) -> nn.Module:
    """The module inside ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` wrappers
    (their state dict keys carry a prefix, and the permutation acts on the wrapped module)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
    for _ in range(8):
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = module.module
        if not isinstance(inner, nn.Module):
            return module
        module = inner
    return module


def _check_magnitude(module: nn.Module, name: str) -> None:
    """Name a tensor whose squared sum overflows its dtype: every squared-distance cost would be inf."""
    for key, value in module.state_dict().items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        big = float(value.detach().abs().max())
        # half precision is matched and scored in float32
        limit = torch.finfo(value.dtype if value.element_size() >= 4 else torch.float32).max
        if big * big * value.numel() > limit:
            raise OverflowError(
                f"{name}: {key!r} (shape {tuple(value.shape)}, {value.dtype}) holds values up to {big:.3g}: "
                f"its squared sum overflows {value.dtype}, so the costs would be inf. Rescale the "
                "weights or convert both models to float64"
            )


def _follow_model(model: nn.Module, reference: nn.Module) -> nn.Module:
    """``reference``, or a copy of it moved and cast to ``model``'s device and per-entry dtypes
    (the reference itself is never moved)."""
    device = module_device(model)
    target = model.state_dict()
    mismatch = any(
        t.device != device or (t.is_floating_point() and t.dtype != target[k].dtype)
        for k, t in reference.state_dict().items()
        if k in target
    )
    if not mismatch:
        return reference
    ref = copy.deepcopy(reference).to(device)
    with torch.no_grad():
        for key, t in [*ref.named_parameters(), *ref.named_buffers()]:
            want = target.get(key)
            if want is not None and t.is_floating_point() and t.dtype != want.dtype:
                t.data = t.data.to(want.dtype)
    return ref


def _check_cost_value(value: Any, cost_fn: Any, *, need_grad: bool) -> Tensor:
    cost = getattr(cost_fn, "__name__", None) or repr(cost_fn)
    if not isinstance(value, Tensor) or value.numel() != 1 or value.ndim > 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else None
        raise TypeError(
            f"the cost {cost} must return a scalar Tensor, got {type(value).__name__}"
            + (f" of shape {shape}" if shape is not None else "")
            + " (reduce it, e.g. with .mean())"
        )
    if not value.is_floating_point():
        raise TypeError(f"the cost {cost} must return a floating-point Tensor, got {value.dtype}")
    if need_grad and not value.requires_grad:
        raise TypeError(
            f"the cost {cost} returned a tensor with no gradient with respect to the permuted model: it "
            "must be computed from view.state / view(...) without .detach(), .item() or torch.no_grad()"
        )
    return value.reshape(())


def _perm_key(perms: Mapping[str, Tensor]) -> tuple:
    return tuple((g, p.numpy().tobytes()) for g, p in sorted(perms.items()))


def align(
    model: nn.Module,
    reference: nn.Module,
    *,
    spec: PermutationSpec | None = None,
    example_inputs: Any = None,
    cost: str | Callable[..., Tensor] = "l2",
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    steps: int = 200,
    lr: float | Literal["auto"] = "auto",
    init: Init | Mapping[str, Tensor] = "weight_matching",
    tau: float | Literal["auto"] | None = None,
    method: Method | Literal["auto"] = "auto",
    early_stopping: int | Literal["auto"] | None = "auto",
    progress: bool = True,
    seed: int | None = None,
    settings: SinkhornSettings | None = None,
    n_iters: int | None = None,
    init_noise: float | None = None,
    init_scale: float | Literal["auto"] | None = None,
    polish: bool | Literal["auto"] = "auto",
    threads: int | str | None = "auto",
) -> AlignResult:
    """Permute ``model``'s hidden units to bring it into ``reference``'s basin (Sinkhorn re-basin).

    Args:
        model: the model to permute (never modified). ``torch.compile`` and ``DataParallel`` wrappers are
            looked through: the wrapped module is aligned and ``result.model`` is a plain module.
        reference: the model to align to (same architecture; never modified). The computation follows
            ``model``: when the reference lives on another device or holds another floating-point dtype,
            a converted copy of it is used.
        spec: the permutation spec; traced from ``example_inputs`` (or the first batch of ``data``) if omitted.
        example_inputs: inputs for :func:`~rebasin_callbacks.trace_spec` (a tensor or a tuple of tensors).
        cost: ``"l2"`` (data-free, the paper's Eq. 7), ``"cosine"`` (data-free), ``"mid"`` / ``"rnd"``
            (task loss on the line between the models; need ``data`` and ``loss_fn``; BatchNorm layers
            use batch statistics there), or any callable ``(view, reference, batch) -> scalar Tensor``.
        data: an iterable of ``(inputs, targets)`` batches (a DataLoader, a list, a generator; dict batches
            with keys such as ``"x"`` / ``"y"`` or ``"image"`` / ``"label"`` work too), cycled as long as
            needed; the first batch also scores the hard permutations, so results compare on the same data.
        loss_fn: ``(outputs, targets) -> loss`` for ``cost="mid" | "rnd"``.
        steps: most optimisation steps.
        lr: Adam learning rate, relative to each group's score scale (in ``(0, 100]``). ``"auto"``: the
            paper's 0.1, except 0.3 for ``"ste"`` after a warm start, which already sits in a local optimum
            the refinement must leave within a few steps to find a better one.
        init: ``"weight_matching"`` (warm start), ``"identity"`` (the paper's start), ``"random"``, or
            ``{group: LongTensor}``.
        tau: Sinkhorn temperature (on top of the per-size score scale), in ``[1e-3, 1e3]``. ``"auto"``: 0.5
            for ``cost="mid"``, whose soft midpoint at tau 1 rewards averaging units rather than choosing a
            better permutation (loss barrier 26-61% below weight matching's on all 9 trained pairs of
            BENCHMARKS.md, against 8-74% at tau 1); 1 for the other costs (``"rnd"`` measured 37-65% below at
            tau 1).
        method: how the relaxation is trained; ``"auto"``: ``"ste"`` for data-free costs, ``"soft"`` for
            data-driven ones (whose soft midpoint loss is the smoother signal on a changing batch).

            * ``"ste"``: straight-through estimator: the cost is evaluated at the hard
              permutation the scores project to, its gradient flows through the Sinkhorn matrix (as Git
              Re-Basin's STE): the optimiser sees exactly what is returned, and a step needs no separate
              scoring. From the identity it recovers 30/30 planted Table 1 permutations (BENCHMARKS.md).
            * ``"soft"``: the cost of the doubly-stochastic matrices themselves (the paper's relaxation).
            * ``"anneal"``: ``"soft"`` with the temperature lowered by 10% per step (to ``tau / 100``), so
              the matrices approach permutations.
            * ``"entropy"``: ``"soft"`` plus a penalty on the matrices' row entropy.
        early_stopping: stop after this many steps without a better hard permutation (``None``: run all
            ``steps``). ``"auto"``: 30 for data-free costs; 100 for data-driven ones, whose hard
            permutations are scored on one batch, so progress shows up slowly and unevenly (after 30 quiet
            steps a trained ResNet pair's midpoint barrier was 6% below weight matching's, after 100 34%;
            BENCHMARKS.md).
            With a data-free cost after a weight-matching warm start, the refinement also
            stops (after at least 2 steps, 4 with ``polish``) before a step that would take it past the warm start's own
            time without improving, so a refinement with nothing to gain costs about one more warm start.
        polish: after each step that reaches a new hard permutation, run weight matching's coordinate
            descent from it and keep the result when it is better: the gradient step leaves the warm
            start's local optimum, the descent settles in a neighbouring one. ``"auto"`` (default): on for
            ``cost="l2"`` after a weight-matching warm start, where weight matching is a local optimum of
            the same cost that gradient steps alone only leave for worse permutations (BENCHMARKS.md:
            without it the refinement ends at weight matching's answer on trained pairs); off otherwise.
        progress: show a progress bar (tqdm, when installed).
        threads: torch's CPU intra-op threads inside the call (:func:`~rebasin_callbacks.utils.thread_limit`):
            ``"auto"`` (1 per 4 cores, or ``$REBASIN_NUM_THREADS``), an int, or ``None`` for no cap.
        seed: makes the run repeatable (initial jitter, weight-matching order, random init, ``"rnd"``'s
            interpolation points, dropout); the global random state is left untouched.
        settings: the relaxation (:class:`~rebasin_callbacks.SinkhornSettings`); by default
            :data:`ALIGN_START` (``tau="auto"``, ``init_scale="auto"``, the other fields' defaults).
            ``seed`` may be given here instead of as ``seed=``.
        n_iters: Sinkhorn iterations per step (solver iterations; ``steps`` counts optimiser steps).
        init_noise: standard deviation of the jitter added to the initial scores.
        init_scale: margin of the initial permutation in the scores. ``"auto"``: the paper's 1 for
            ``method="ste"`` (its forward pass is the hard permutation whatever the margin), and for the
            soft methods a margin adapted to each group size (``log(n - 1)``, see
            :func:`~rebasin_callbacks.rebasin.auto_scale`: a fixed margin leaves wide layers almost uniform).
        tau / n_iters / init_noise / init_scale: set one field of ``settings`` (given ones win).

    Returns:
        An :class:`AlignResult`; ``result.model`` computes exactly what ``model`` computes.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import PermutationSpec, align, permute, random_permutations
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> spec = PermutationSpec.from_axes(
        ...     {"0.weight": ("P0", None), "0.bias": ("P0",), "2.weight": (None, "P0"), "2.bias": (None,)},
        ...     mlp.state_dict(),
        ... )
        >>> other = permute(mlp, spec, random_permutations(spec))
        >>> result = align(other, mlp, spec=spec, progress=False, seed=0)
        >>> bool(torch.equal(result.model[0].weight, mlp[0].weight))
        True
    """
    start = time.perf_counter()
    model = _unwrap(model, "model")
    reference = _unwrap(reference, "reference")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if lr != "auto" and not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= 100):
        raise ValueError(
            f"lr must be a number in (0, 100] (relative to each group's score scale), got {lr!r}"
        )
    settings = settings_from(
        settings, ALIGN_START, tau=tau, n_iters=n_iters, init_noise=init_noise, init_scale=init_scale,
        seed=seed,
    )  # fmt: skip
    if isinstance(settings.seed, torch.Generator):
        raise TypeError("align: seed must be an int or None (it also seeds weight matching's group order)")
    seed = settings.seed
    tau, n_iters, init_noise, init_scale = (
        settings.tau,
        settings.n_iters,
        settings.init_noise,
        settings.init_scale,
    )
    if method not in (*METHODS, "auto"):
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if early_stopping not in (None, "auto") and not (isinstance(early_stopping, int) and early_stopping >= 1):
        raise ValueError(f"early_stopping must be an int >= 1, 'auto' or None, got {early_stopping!r}")
    if isinstance(example_inputs, Mapping):
        raise TypeError(
            f"example_inputs is a dict (keys {list(example_inputs)[:5]}): pass the model's positional "
            "input(s), a tensor or a tuple of tensors, e.g. example_inputs=batch['x']"
        )
    check_compatible(model, reference)
    check_finite(model, "model")
    check_finite(reference, "reference")
    _check_magnitude(model, "model")
    _check_magnitude(reference, "reference")
    device = module_device(model)
    reference = _follow_model(model, reference)

    cost_fn = resolve_cost(cost, loss_fn)
    if getattr(cost_fn, "needs_data", False) and data is None:
        raise ValueError(
            f"cost {cost_fn!r} needs data: pass data=... (an iterable of (inputs, targets) batches)"
        )
    if method == "auto":
        method = "soft" if getattr(cost_fn, "needs_data", False) else "ste"
    if tau == "auto":
        tau = _TAU_MID if isinstance(cost_fn, MidCost) else 1.0
    if early_stopping == "auto":
        early_stopping = _PATIENCE_DATA if getattr(cost_fn, "needs_data", False) else _PATIENCE
    if polish == "auto":
        # weight matching's coordinate descent maximises exactly the L2 cost's inner products
        polish = type(cost_fn) is L2Cost and isinstance(init, str) and init == "weight_matching"
    elif not isinstance(polish, bool):
        raise ValueError(f"polish must be True, False or 'auto', got {polish!r}")
    if lr == "auto":
        warm_start = not (isinstance(init, str) and init in ("identity", "random"))
        lr = 0.3 if warm_start and method == "ste" else 0.1
    if isinstance(cost, str) and isinstance(cost_fn, RndCost) and seed is not None:
        cost_fn.generator = torch.Generator().manual_seed(int(seed))
    score_fn = getattr(cost_fn, "score", cost_fn)

    batches: _Batches | None = None
    first: Any = None
    if data is not None:
        # A single (inputs, targets) pair is accepted as a one-batch dataset.
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
            data = [data]
        if isinstance(data, (Tensor, Mapping)):
            data = [data]
        batches = _Batches(data, device)
        first = next(batches)
        if example_inputs is None and spec is None:
            example_inputs = first[0] if isinstance(first, (tuple, list)) else first
    if spec is None and example_inputs is None and infer_example_inputs(model) is None:
        raise ValueError(
            "align needs a permutation spec: pass spec=..., example_inputs=... (to trace one) or data=..."
        )
    # Many small kernels: a capped thread count keeps a busy CPU from turning seconds into minutes.
    with thread_limit(threads):
        if spec is None:
            _phase(f"align: tracing the permutation spec of {type(model).__name__}", progress)
        spec = resolve_spec(model, spec, example_inputs, purpose="nothing to align")
        if not isinstance(cost_fn, (L2Cost, CosineCost)):
            _probe_cost(model, reference, cost_fn, first)

        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        fork = torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [], enabled=seed is not None
        )
        with fork:
            if seed is not None:
                torch.manual_seed(int(seed))
            if init_scale == "auto" and method == "ste":
                init_scale = 1.0
            t0 = time.perf_counter()
            if isinstance(init, str) and init == "weight_matching":
                n = len(spec)
                _phase(f"align: weight matching warm start ({n} group{'s' if n != 1 else ''})", progress)
            match = _Matcher(model, reference, spec, seed)
            perms0 = _initial_permutations(spec, init, gen, match)
            warm = time.perf_counter() - t0 if isinstance(init, str) and init == "weight_matching" else None
            result = _refine(
                model, reference, spec, perms0, cost_fn, score_fn, batches, first,
                steps=steps, lr=lr, tau=tau, n_iters=n_iters, init_noise=init_noise, init_scale=init_scale, gen=gen,
                early_stopping=early_stopping, progress=progress, method=method, budget=warm,
                polish=match.polish if polish else None,
                matcher=match,
                budget_applies=not getattr(cost_fn, "needs_data", False),
            )  # fmt: skip
        perms, history, n_steps = result
        aligned = permute(model, spec, perms)
        return AlignResult(
            perms=perms,
            model=aligned,
            spec=spec,
            history=history,
            steps=n_steps,
            seconds=time.perf_counter() - start,
        )


def _probe_cost(model: nn.Module, reference: nn.Module, cost_fn: Any, batch: Any) -> None:
    """Call a cost once on the unpermuted model, before any work, so a cost that returns a vector, a
    detached tensor or fails on the batch says so at once."""
    params = {n for n, _ in model.named_parameters()}
    state = {
        k: (v.detach().requires_grad_(True) if k in params and v.is_floating_point() else v.detach())
        for k, v in model.state_dict(keep_vars=True).items()
    }
    _check_cost_value(cost_fn(PermutedView(model, state), reference, batch), cost_fn, need_grad=True)


class _Matcher:
    """Weight matching for one ``align()`` call: the warm start and every polish share one problem, so a
    polish recomputes only the similarity terms whose neighbours moved (built on first use)."""

    def __init__(self, model: nn.Module, reference: nn.Module, spec: PermutationSpec, seed: int | None):
        self.model, self.reference, self.spec, self.seed = model, reference, spec, seed
        self._problem: MatchingProblem | None = None

    @property
    def problem(self) -> MatchingProblem:
        """The shared problem, built on first use."""
        if self._problem is None:
            self._problem = MatchingProblem.from_states(
                self.spec, self.model.state_dict(), self.reference.state_dict()
            )
        return self._problem

    def __call__(self, init: Mapping[str, Tensor] | None = None, n_iters: int = 100) -> dict[str, Tensor]:
        return self.problem.descend(n_iters=n_iters, init=init, seed=self.seed)

    def polish(self, perms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The local optimum of weight matching's coordinate descent next to ``perms``."""
        return self(init=perms, n_iters=_POLISH_SWEEPS)


def _initial_permutations(
    spec: PermutationSpec,
    init: Init | Mapping[str, Tensor],
    gen: torch.Generator | None,
    match: _Matcher,
) -> dict[str, Tensor]:
    if isinstance(init, Mapping):
        perms = identity_permutations(spec)
        perms.update({g: p.detach().cpu().long() for g, p in init.items()})
        return perms
    if init == "weight_matching":
        return match()
    if init == "identity":
        return identity_permutations(spec)
    if init == "random":
        return random_permutations(spec, gen)
    raise ValueError(
        f"init must be 'weight_matching', 'identity', 'random' or a dict of permutations, got {init!r}"
    )


def _refine(
    model: nn.Module,
    reference: nn.Module,
    spec: PermutationSpec,
    perms0: dict[str, Tensor],
    cost_fn: Callable[..., Tensor],
    score_fn: Callable[..., Tensor],
    batches: _Batches | None,
    first: Any,
    *,
    steps: int,
    lr: float,
    tau: float,
    n_iters: int,
    init_noise: float,
    init_scale: float | Literal["auto"],
    gen: torch.Generator | None,
    early_stopping: int | None,
    progress: bool,
    method: Method,
    budget: float | None,
    polish: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    budget_applies: bool = True,
    matcher: _Matcher | None = None,
) -> tuple[dict[str, Tensor], dict[str, list[float]], int]:
    t_enter = time.perf_counter()
    rb = ReBasin(
        model,
        spec,
        init=perms0,
        tau=tau,
        n_iters=n_iters,
        init_scale=init_scale,
        init_noise=init_noise,
        seed=gen,
    )
    cache: dict[tuple, float] = {}
    polished: set[tuple] = {_perm_key(perms0)}

    def remember(key: tuple, value: float) -> float:
        if math.isnan(value):
            raise FloatingPointError(f"the cost of a hard permutation is NaN (cost {cost_fn!r})")
        if math.isinf(value):
            raise FloatingPointError(
                f"the cost of a hard permutation is {value} (cost {cost_fn!r}): it overflows"
            )
        cache[key] = value
        return value

    def hard_cost(perms: Mapping[str, Tensor]) -> float:
        key = _perm_key(perms)
        if key in cache:
            return cache[key]
        with torch.no_grad():
            value = score_fn(PermutedView(model, rb.permuted_state(dict(perms))), reference, first)
        return remember(key, float(_check_cost_value(value, cost_fn, need_grad=False)))

    best_perms = dict(perms0)
    best = hard_cost(best_perms)
    history: dict[str, list[float]] = {
        "cost": [],
        "hard_cost": [],
        "best_cost": [],
        "time": [],
        "init_cost": [best],
    }
    # The model as it is (identity permutations) is a candidate too: the result is never worse than
    # leaving the model alone, e.g. when a model already aligned in place is aligned again.
    identity = identity_permutations(spec)
    if _perm_key(identity) != _perm_key(best_perms):
        as_is = hard_cost(identity)
        history["identity_cost"] = [as_is]
        if as_is < best:
            best, best_perms = as_is, identity
    lower = getattr(cost_fn, "lower_bound", None)
    if steps == 0 or (lower is not None and best <= lower + 1e-12):
        return best_perms, history, 0

    # Adam moves every score by about lr per step: scale it with the scores so a group of any size can
    # change its permutation in a similar number of steps.
    opt = torch.optim.Adam([{"params": [p], "lr": lr * rb.scales[b]} for b, p in rb.scores.items()])
    bar = _progress_bar(steps, progress)
    rb.train()
    base = rb.base_state()
    penalty = _ENTROPY_WEIGHT * abs(best) if method == "entropy" else 0.0
    # The default data-free step (straight-through, L2) has its gradient in closed form: no matrix is
    # applied to the weights, and only the similarity terms whose neighbours moved are recomputed.
    l2_gradient = (
        L2Gradient(model, reference, spec, problem=None if matcher is None else matcher.problem)
        if method == "ste" and type(cost_fn) is L2Cost and score_fn is cost_fn and not penalty
        else None
    )
    t_start = time.perf_counter()
    t_best = t_enter  # the refinement's setup counts against the time budget too
    stale = 0
    step = 0
    with warnings.catch_warnings():
        # The soft matrices are a relaxation, never returned: what counts is the hard permutation, scored
        # exactly at every step. Low temperatures ("anneal") leave them unconverged on purpose.
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        try:
            for step in range(1, steps + 1):
                batch = first if step == 1 or batches is None else next(batches)
                if method == "anneal":
                    rb.tau = tau * max(_ANNEAL_FLOOR, _ANNEAL_RATE**step)
                opt.zero_grad(set_to_none=True)
                soft_mats = rb.soft_permutations()
                if l2_gradient is not None:
                    # The same straight-through step as below, with L2's gradient in closed form.
                    perms = rb.project()
                    soft = hard_cost(perms)
                    grads = l2_gradient(perms)
                    if grads:  # empty only when no parameter moves with any group
                        torch.autograd.backward(
                            [soft_mats[g] for g in grads],
                            [G.to(soft_mats[g].dtype) for g, G in grads.items()],
                        )
                    opt.step()
                    hard = soft
                else:
                    if method == "ste":
                        # Straight-through: the forward pass sees the projected permutation exactly
                        # (P - P.detach() is zero), the backward pass the Sinkhorn gradient.
                        perms = rb.project()
                        mats = {
                            g: perm_to_matrix(perms[g].to(P.device), P.dtype) + (P - P.detach())
                            for g, P in soft_mats.items()
                        }
                    else:
                        mats = soft_mats
                    view = PermutedView(model, apply_soft_permutations(base, spec, mats))
                    value = _check_cost_value(cost_fn(view, reference, batch), cost_fn, need_grad=True)
                    soft = float(value.detach())
                    if not math.isfinite(soft):
                        raise FloatingPointError(f"the cost is {soft} at step {step} (cost {cost_fn!r})")
                    if penalty:
                        value = value + penalty * _mean_entropy(soft_mats)
                    value.backward()
                    opt.step()
                    if method == "ste":
                        key = _perm_key(perms)
                        if batch is first and score_fn is cost_fn and key not in cache:
                            remember(key, soft)  # the forward pass was the hard cost on the scoring batch
                        hard = hard_cost(perms)
                    else:
                        perms = rb.project()
                        hard = hard_cost(perms)
                if polish is not None:
                    key = _perm_key(perms)
                    if key not in polished:
                        # The step's permutation seeds a coordinate descent on the weights: a local
                        # optimum next to where the gradient led, which may beat the warm start's.
                        polished.add(key)
                        better = polish(perms)
                        polished.add(_perm_key(better))
                        if hard_cost(better) < hard:
                            perms, hard = better, hard_cost(better)
                stale += 1
                if hard < best:
                    if hard < best - _SIGNIFICANT * abs(best):
                        stale, t_best = 0, time.perf_counter()
                    best, best_perms = hard, perms
                now = time.perf_counter()
                history["cost"].append(soft)
                history["hard_cost"].append(hard)
                history["best_cost"].append(best)
                history["time"].append(now - t_start)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(cost=f"{soft:.4g}", best=f"{best:.4g}", refresh=False)
                if lower is not None and best <= lower + 1e-12:
                    break
                if early_stopping is not None and stale >= early_stopping:
                    break
                # A refinement that would pass the warm start's time without improving gives up: without
                # a gain it costs at most about one more warm start.
                last = now - (t_start + history["time"][-2]) if step > 1 else now - t_start
                if (
                    early_stopping is not None
                    and budget is not None
                    and budget_applies
                    and stale >= (_MIN_STALE if polish is not None else 2)
                    and now - t_best + last > budget
                ):
                    break
        finally:
            if bar is not None:
                bar.close()
    return best_perms, history, step


def _mean_entropy(mats: Mapping[str, Tensor]) -> Tensor:
    """Mean row entropy of the soft permutations, each divided by its maximum ``log n`` (0 at a
    permutation, 1 at the uniform matrix)."""
    terms = []
    for P in mats.values():
        n = P.shape[-1]
        if n > 1:
            h = -(P * P.clamp_min(1e-12).log()).sum(-1).mean()
            terms.append(h / math.log(n))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def _phase(message: str, enabled: bool) -> None:
    """A phase line on stderr (through tqdm when installed, so it does not break a bar)."""
    if not enabled:
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        print(message, file=sys.stderr)
        return
    tqdm.write(message, file=sys.stderr)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc="align: Sinkhorn refinement", leave=False, dynamic_ncols=True)
