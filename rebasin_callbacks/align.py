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
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rebasin_callbacks.batches import infer_example_inputs, split_batch, to_device
from rebasin_callbacks.costs import CostHints, cost_hints, resolve_cost
from rebasin_callbacks.devices import module_device
from rebasin_callbacks.matching import MatchingProblem
from rebasin_callbacks.permute import identity_permutations, permute, random_permutations
from rebasin_callbacks.rebasin import PermutedView, ReBasin
from rebasin_callbacks.refine import STEPS, Plan, Problem, check_cost_value, refine, stopping_for
from rebasin_callbacks.settings import SinkhornSettings, settings_from
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.spec_source import resolve_spec
from rebasin_callbacks.states import check_compatible, check_finite
from rebasin_callbacks.threads import thread_limit

__all__ = ["align", "AlignResult", "ALIGN_START"]

#: align's relaxation: the cost chooses the temperature (:attr:`CostHints.tau`) and the margin adapts
#: to the method (1 for ``"ste"``, per group size for the soft methods); the other fields are the defaults.
ALIGN_START = SinkhornSettings(tau="auto", init_scale="auto")

Init = Literal["weight_matching", "identity", "random"]
Method = Literal["ste", "soft", "anneal", "entropy"]
METHODS: tuple[str, ...] = tuple(STEPS)

# With polish, the fewest steps without a gain before the time budget may stop the refinement: on trained
# pairs the first better permutation comes at step 4 (benchmarks/quality.py).
_MIN_STALE = 4
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

    def __iter__(self) -> _Batches:
        return self

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
    _check_arguments(
        steps=steps, lr=lr, method=method, early_stopping=early_stopping, example_inputs=example_inputs
    )
    settings = settings_from(
        settings, ALIGN_START, tau=tau, n_iters=n_iters, init_noise=init_noise, init_scale=init_scale,
        seed=seed,
    )  # fmt: skip
    if isinstance(settings.seed, torch.Generator):
        raise TypeError("align: seed must be an int or None (it also seeds weight matching's group order)")
    reference = _check_models(model, reference)
    cost_fn = resolve_cost(cost, loss_fn, seed=settings.seed)
    hints = cost_hints(cost_fn)
    if hints.needs_data and data is None:
        raise ValueError(
            f"cost {cost_fn!r} needs data: pass data=... (an iterable of (inputs, targets) batches)"
        )
    plan = _plan(
        settings,
        hints,
        init=init,
        lr=lr,
        method=method,
        steps=steps,
        early_stopping=early_stopping,
        polish=polish,
    )
    batches, first = _open_data(data, module_device(model))
    if spec is None and example_inputs is None and first is None and infer_example_inputs(model) is None:
        raise ValueError(
            "align needs a permutation spec: pass spec=..., example_inputs=... (to trace one) or data=..."
        )
    # Many small kernels: a capped thread count keeps a busy CPU from turning seconds into minutes.
    with thread_limit(threads):
        if spec is None:
            _phase(f"align: tracing the permutation spec of {type(model).__name__}", progress)
        spec = resolve_spec(model, spec, example_inputs, batch=first, purpose="nothing to align")
        if hints.probe:
            _probe_cost(model, reference, cost_fn, first)
        problem = Problem(model, reference, spec, cost_fn, first, batches)
        perms, history, n_steps = _search(problem, plan, init, progress)
        return AlignResult(
            perms=perms,
            model=permute(model, spec, perms),
            spec=spec,
            history=history,
            steps=n_steps,
            seconds=time.perf_counter() - start,
        )


def _check_arguments(*, steps: Any, lr: Any, method: Any, early_stopping: Any, example_inputs: Any) -> None:
    """align's own arguments, checked before any work (the relaxation's are :class:`SinkhornSettings`')."""
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if lr != "auto" and not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= 100):
        raise ValueError(
            f"lr must be a number in (0, 100] (relative to each group's score scale), got {lr!r}"
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


def _check_models(model: nn.Module, reference: nn.Module) -> nn.Module:
    """Both models checked before any work; the reference as the computation needs it (on ``model``'s
    device, in its dtypes: a converted copy when it is not)."""
    check_compatible(model, reference)
    check_finite(model, "model")
    check_finite(reference, "reference")
    _check_magnitude(model, "model")
    _check_magnitude(reference, "reference")
    return _follow_model(model, reference)


def _plan(
    settings: SinkhornSettings,
    hints: CostHints,
    *,
    init: Init | Mapping[str, Tensor],
    lr: float | Literal["auto"],
    method: str,
    steps: int,
    early_stopping: int | Literal["auto"] | None,
    polish: bool | Literal["auto"],
) -> Plan:
    """Every ``"auto"`` resolved once, from the cost's hints."""
    weight_matching = isinstance(init, str) and init == "weight_matching"
    if method == "auto":
        method = hints.preferred_method
    if polish == "auto":
        polish = hints.polish and weight_matching
    elif not isinstance(polish, bool):
        raise ValueError(f"polish must be True, False or 'auto', got {polish!r}")
    if lr == "auto":
        # a warm start already sits in a local optimum that the straight-through refinement must leave
        # within a few steps to find a better one
        warm_start = not (isinstance(init, str) and init in ("identity", "random"))
        lr = 0.3 if warm_start and method == "ste" else 0.1
    # "ste"'s forward pass is the hard permutation whatever the margin: the paper's 1
    init_scale = 1.0 if settings.init_scale == "auto" and method == "ste" else settings.init_scale
    return Plan(
        method=method,
        settings=settings.merged(
            tau=hints.tau if settings.tau == "auto" else settings.tau, init_scale=init_scale
        ),
        lr=float(lr),
        steps=steps,
        patience=hints.preferred_patience if early_stopping == "auto" else early_stopping,
        polish=polish,
        budget_applies=not hints.needs_data,
    )


def _open_data(data: Iterable[Any] | None, device: torch.device) -> tuple[_Batches | None, Any]:
    """The cycling batches of ``data`` and its first batch (the scoring batch), or ``(None, None)``."""
    if data is None:
        return None, None
    # A single (inputs, targets) pair is accepted as a one-batch dataset.
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    if isinstance(data, (Tensor, Mapping)):
        data = [data]
    batches = _Batches(data, device)
    return batches, next(batches)


def _search(
    problem: Problem, plan: Plan, init: Init | Mapping[str, Tensor], progress: bool
) -> tuple[dict[str, Tensor], dict[str, list[float]], int]:
    """The warm start, then the refinement from it, repeatable under ``seed`` without touching the global
    random state."""
    seed = plan.settings.seed
    assert seed is None or isinstance(seed, int)
    device = module_device(problem.model)
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(int(seed))
        t0 = time.perf_counter()
        warm = isinstance(init, str) and init == "weight_matching"
        if warm:
            n = len(problem.spec)
            _phase(f"align: weight matching warm start ({n} group{'s' if n != 1 else ''})", progress)
        problem.matcher = _Matcher(problem.model, problem.reference, problem.spec, seed)
        perms0 = _initial_permutations(problem.spec, init, gen, problem.matcher)
        budget = time.perf_counter() - t0 if warm else None
        if plan.polish:
            problem.polish = problem.matcher.polish
        t_enter = time.perf_counter()  # the refinement's setup counts against the time budget too
        rb = ReBasin(problem.model, problem.spec, init=perms0, settings=plan.settings.merged(seed=gen))
        stopping = stopping_for(plan, problem.cost_fn, budget, _MIN_STALE if plan.polish else 2, t_enter)
        bar = functools.partial(_progress_bar, enabled=progress)
        return refine(problem, plan, perms0, rb, stopping, bar)


def _probe_cost(model: nn.Module, reference: nn.Module, cost_fn: Any, batch: Any) -> None:
    """Call a cost once on the unpermuted model, before any work, so a cost that returns a vector, a
    detached tensor or fails on the batch says so at once."""
    params = {n for n, _ in model.named_parameters()}
    state = {
        k: (v.detach().requires_grad_(True) if k in params and v.is_floating_point() else v.detach())
        for k, v in model.state_dict(keep_vars=True).items()
    }
    check_cost_value(cost_fn(PermutedView(model, state), reference, batch), cost_fn, need_grad=True)


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


def _progress_bar(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc="align: Sinkhorn refinement", leave=False, dynamic_ncols=True)
