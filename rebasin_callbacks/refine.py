"""Align's Sinkhorn refinement in named parts: one step function per relaxation method, a scorer of hard
permutations and a stopping object with named rules.

:func:`refine` trains a :class:`~rebasin_callbacks.ReBasin`'s scores with Adam, one step function of
:data:`STEPS` per optimiser step. A step returns the hard permutation it reached, the cost the optimiser
saw and that permutation's exact (hard) cost; the best hard permutation seen is kept. :class:`Stopping`
says when to stop, each rule a method (OTT-JAX's ``_converged`` / ``_continue`` is the model).

A new relaxation method is one function ``(run, step, batch) -> Step`` added to :data:`STEPS`
(and to ``align.METHODS``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from rebasin_callbacks.costs import cost_hints
from rebasin_callbacks.permute import identity_permutations, perm_to_matrix
from rebasin_callbacks.rebasin import PermutedView, ReBasin, apply_soft_permutations
from rebasin_callbacks.settings import SinkhornSettings
from rebasin_callbacks.sinkhorn import SinkhornConvergenceWarning
from rebasin_callbacks.spec import PermutationSpec

__all__ = ["Plan", "Problem", "Stopping", "STEPS", "refine", "check_cost_value", "perm_key"]

Perms = dict[str, Tensor]
History = dict[str, list[float]]

# "anneal": tau_t = tau * max(_ANNEAL_FLOOR, _ANNEAL_RATE ** t); "entropy": penalty weight relative to
# the warm start's cost (a cost-scale-free weight).
_ANNEAL_RATE = 0.9
_ANNEAL_FLOOR = 0.01
_ENTROPY_WEIGHT = 0.1
# A gain smaller than this (relative) is kept but does not extend the search.
_SIGNIFICANT = 1e-3


@dataclass(frozen=True)
class Plan:
    """Every ``"auto"`` of :func:`~rebasin_callbacks.align` resolved once, from the cost's hints.

    Attributes:
        method: a key of :data:`STEPS`.
        settings: the relaxation, with ``tau`` a number (``init_scale`` may stay ``"auto"``: per group size).
        lr: Adam's learning rate relative to each group's score scale.
        steps: most optimiser steps.
        patience: steps without a significant gain before stopping (``None``: run all ``steps``).
        polish: polish each new permutation with weight matching's coordinate descent.
        budget_applies: a data-free cost: the search may stop at the warm start's own time.
    """

    method: str
    settings: SinkhornSettings
    lr: float
    steps: int
    patience: int | None
    polish: bool
    budget_applies: bool


@dataclass
class Problem:
    """What is aligned to what, and how it is scored."""

    model: nn.Module
    reference: nn.Module
    spec: PermutationSpec
    cost_fn: Callable[..., Tensor]
    first: Any = None  # the scoring batch (None for data-free costs)
    batches: Iterator[Any] | None = None  # the batches the steps see after the first
    polish: Callable[[Perms], Perms] | None = None
    matcher: Any = None  # holds the warm start's MatchingProblem (``.problem``), shared by a closed form

    @property
    def score_fn(self) -> Callable[..., Tensor]:
        """The cost used to compare hard permutations (a deterministic version where the cost has one)."""
        return getattr(self.cost_fn, "score", self.cost_fn)


class Step(NamedTuple):
    """What one optimiser step reached: its hard permutation, the cost the optimiser saw, the hard cost."""

    perms: Perms
    soft: float
    hard: float


def perm_key(perms: Mapping[str, Tensor]) -> tuple:
    """A hashable key of hard permutations."""
    return tuple((g, p.numpy().tobytes()) for g, p in sorted(perms.items()))


def check_cost_value(value: Any, cost_fn: Any, *, need_grad: bool) -> Tensor:
    """``value`` as a 0-d tensor, or a TypeError naming the cost and what it returned."""
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


class Scorer:
    """The exact cost of hard permutations on the scoring batch, each computed once."""

    def __init__(self, problem: Problem, rb: ReBasin):
        self.problem, self.rb = problem, rb
        self.cache: dict[tuple, float] = {}

    def remember(self, key: tuple, value: float) -> float:
        """Cache ``value`` as the cost of ``key``; NaN and inf are errors naming the cost."""
        cost_fn = self.problem.cost_fn
        if math.isnan(value):
            raise FloatingPointError(f"the cost of a hard permutation is NaN (cost {cost_fn!r})")
        if math.isinf(value):
            raise FloatingPointError(
                f"the cost of a hard permutation is {value} (cost {cost_fn!r}): it overflows"
            )
        self.cache[key] = value
        return value

    def __call__(self, perms: Mapping[str, Tensor]) -> float:
        key = perm_key(perms)
        if key in self.cache:
            return self.cache[key]
        p = self.problem
        with torch.no_grad():
            value = p.score_fn(
                PermutedView(p.model, self.rb.permuted_state(dict(perms))), p.reference, p.first
            )
        return self.remember(key, float(check_cost_value(value, p.cost_fn, need_grad=False)))


@dataclass
class Stopping:
    """When the refinement stops, one named rule each (checked after every step, in this order).

    Attributes:
        lower_bound: the cost's floor: reaching it is :meth:`converged`.
        patience: steps without a significant gain before :meth:`exhausted` (``None``: never).
        budget: seconds the search may spend past its last gain (the warm start's own time), or ``None``.
        min_stale: the fewest quiet steps before the budget may stop the search.
    """

    lower_bound: float | None
    patience: int | None
    budget: float | None = None
    min_stale: int = 2
    stale: int = 0
    t_best: float = field(default_factory=time.perf_counter)

    def record(self, hard: float, best: float) -> None:
        """Count one step; a significant gain resets the count and the budget's clock."""
        self.stale += 1
        if hard < best - _SIGNIFICANT * abs(best):
            self.stale, self.t_best = 0, time.perf_counter()

    def converged(self, best: float) -> bool:
        """The best cost is at the cost's floor: nothing can beat it."""
        return self.lower_bound is not None and best <= self.lower_bound + 1e-12

    def exhausted(self) -> bool:
        """``patience`` steps in a row brought no significant gain."""
        return self.patience is not None and self.stale >= self.patience

    def over_budget(self, now: float, last: float) -> bool:
        """One more step would take the search past the warm start's time without a gain: without a gain
        a refinement then costs at most about one more warm start."""
        if self.patience is None or self.budget is None or self.stale < self.min_stale:
            return False
        return now - self.t_best + last > self.budget

    def reason(self, best: float, now: float, last: float) -> str | None:
        """The name of the first rule that says stop, else ``None``."""
        if self.converged(best):
            return "converged"
        if self.exhausted():
            return "exhausted"
        if self.over_budget(now, last):
            return "over_budget"
        return None


@dataclass
class Run:
    """The state a step function works on."""

    problem: Problem
    plan: Plan
    rb: ReBasin
    opt: torch.optim.Optimizer
    score: Scorer
    base: dict[str, Tensor]
    penalty: float = 0.0
    gradient: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None


def _step_closed_form(run: Run, step: int, batch: Any) -> Step:
    """The straight-through step with the cost's gradient in closed form: no matrix is applied to the
    weights, only the Sinkhorn backward runs in autograd."""
    assert run.gradient is not None
    soft_mats = run.rb.soft_permutations()
    perms = run.rb.project()
    hard = run.score(perms)
    grads = run.gradient(perms)
    if grads:  # empty only when no parameter moves with any group
        torch.autograd.backward(
            [soft_mats[g] for g in grads], [G.to(soft_mats[g].dtype) for g, G in grads.items()]
        )
    run.opt.step()
    return Step(perms, hard, hard)


def _evaluate(
    run: Run, step: int, batch: Any, mats: Mapping[str, Tensor], soft_mats: Mapping[str, Tensor]
) -> float:
    """The cost of the model permuted by ``mats`` on ``batch``, backpropagated (with the entropy penalty)."""
    p = run.problem
    view = PermutedView(p.model, apply_soft_permutations(run.base, p.spec, mats))
    value = check_cost_value(p.cost_fn(view, p.reference, batch), p.cost_fn, need_grad=True)
    soft = float(value.detach())
    if not math.isfinite(soft):
        raise FloatingPointError(f"the cost is {soft} at step {step} (cost {p.cost_fn!r})")
    if run.penalty:
        value = value + run.penalty * _mean_entropy(soft_mats)
    value.backward()
    run.opt.step()
    return soft


def _step_ste(run: Run, step: int, batch: Any) -> Step:
    """Straight-through: the forward pass sees the projected permutation exactly (``P - P.detach()`` is
    zero), the backward pass the Sinkhorn gradient."""
    soft_mats = run.rb.soft_permutations()
    perms = run.rb.project()
    mats = {
        g: perm_to_matrix(perms[g].to(P.device), P.dtype) + (P - P.detach()) for g, P in soft_mats.items()
    }
    soft = _evaluate(run, step, batch, mats, soft_mats)
    key = perm_key(perms)
    p = run.problem
    if batch is p.first and p.score_fn is p.cost_fn and key not in run.score.cache:
        run.score.remember(key, soft)  # the forward pass was the hard cost on the scoring batch
    return Step(perms, soft, run.score(perms))


def _step_soft(run: Run, step: int, batch: Any) -> Step:
    """The paper's relaxation: the cost of the doubly-stochastic matrices themselves."""
    soft_mats = run.rb.soft_permutations()
    soft = _evaluate(run, step, batch, soft_mats, soft_mats)
    perms = run.rb.project()
    return Step(perms, soft, run.score(perms))


def _step_anneal(run: Run, step: int, batch: Any) -> Step:
    """``"soft"`` with the temperature lowered by 10% per step (to ``tau / 100``)."""
    run.rb.tau = run.plan.settings.temperature * max(_ANNEAL_FLOOR, _ANNEAL_RATE**step)
    return _step_soft(run, step, batch)


#: method -> its step function (``"entropy"`` is ``"soft"`` with a penalty, set up in :func:`refine`)
STEPS: dict[str, Callable[[Run, int, Any], Step]] = {
    "ste": _step_ste,
    "soft": _step_soft,
    "anneal": _step_anneal,
    "entropy": _step_soft,
}


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


def _start(problem: Problem, perms0: Perms, rb: ReBasin) -> tuple[Scorer, Perms, float, History]:
    """The scorer, and the best of the warm start and the model as it is (identity permutations): the
    result is never worse than leaving the model alone, e.g. when a model already aligned in place is
    aligned again."""
    score = Scorer(problem, rb)
    best_perms, best = dict(perms0), score(perms0)
    history: History = {"cost": [], "hard_cost": [], "best_cost": [], "time": [], "init_cost": [best]}
    identity = identity_permutations(problem.spec)
    if perm_key(identity) != perm_key(best_perms):
        as_is = score(identity)
        history["identity_cost"] = [as_is]
        if as_is < best:
            best, best_perms = as_is, identity
    return score, best_perms, best, history


def _prepare(problem: Problem, plan: Plan, rb: ReBasin, score: Scorer, best: float) -> Run:
    # Adam moves every score by about lr per step: scale it with the scores so a group of any size can
    # change its permutation in a similar number of steps.
    opt = torch.optim.Adam([{"params": [p], "lr": plan.lr * rb.scales[b]} for b, p in rb.scores.items()])
    rb.train()
    run = Run(problem, plan, rb, opt, score, rb.base_state())
    run.penalty = _ENTROPY_WEIGHT * abs(best) if plan.method == "entropy" else 0.0
    closed_form = getattr(problem.cost_fn, "closed_form_gradient", None)
    # The closed form has no gradient for block groups (heads): with any, the straight-through step runs
    # through autograd so whole heads move too (on trained ViT pairs this went below weight matching).
    if (
        plan.method == "ste"
        and closed_form is not None
        and problem.score_fn is problem.cost_fn
        and not problem.spec.block_groups
    ):
        shared = None if problem.matcher is None else problem.matcher.problem
        run.gradient = closed_form(problem.model, problem.reference, problem.spec, shared)
    return run


def _polish(problem: Problem, score: Scorer, polished: set[tuple], reached: Step) -> Step:
    """The step's permutation seeds a coordinate descent on the weights: a local optimum next to where the
    gradient led, which may beat the warm start's."""
    key = perm_key(reached.perms)
    if problem.polish is None or key in polished:
        return reached
    polished.add(key)
    better = problem.polish(reached.perms)
    polished.add(perm_key(better))
    if score(better) < reached.hard:
        return Step(better, reached.soft, score(better))
    return reached


def refine(
    problem: Problem,
    plan: Plan,
    perms0: Perms,
    rb: ReBasin,
    stopping: Stopping,
    progress: Callable[[int], Any] | None = None,
) -> tuple[Perms, History, int]:
    """Train ``rb``'s scores from ``perms0``; the best hard permutations, the history and the steps run.

    ``progress(total)`` makes a tqdm-like bar (``update`` / ``set_postfix`` / ``close``), or ``None``.
    """
    score, best_perms, best, history = _start(problem, perms0, rb)
    if plan.steps == 0 or stopping.converged(best):
        return best_perms, history, 0
    run = _prepare(problem, plan, rb, score, best)
    bar = progress(plan.steps) if progress is not None else None
    try:
        return _loop(run, stopping, perms0, (best_perms, best, history), bar)
    finally:
        if bar is not None:
            bar.close()


def _loop(
    run: Run, stopping: Stopping, perms0: Perms, start: tuple[Perms, float, History], bar: Any
) -> tuple[Perms, History, int]:
    problem, plan, score = run.problem, run.plan, run.score
    best_perms, best, history = start
    step_fn = _step_closed_form if run.gradient is not None else STEPS[plan.method]
    polished: set[tuple] = {perm_key(perms0)}
    t_start, step = time.perf_counter(), 0
    with warnings.catch_warnings():
        # The soft matrices are a relaxation, never returned: what counts is the hard permutation, scored
        # exactly at every step. Low temperatures ("anneal") leave them unconverged on purpose.
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        for step in range(1, plan.steps + 1):
            batch = problem.first if step == 1 or problem.batches is None else next(problem.batches)
            run.opt.zero_grad(set_to_none=True)
            reached = _polish(problem, score, polished, step_fn(run, step, batch))
            stopping.record(reached.hard, best)
            if reached.hard < best:
                best, best_perms = reached.hard, reached.perms
            now = time.perf_counter()
            for name, value in (("cost", reached.soft), ("hard_cost", reached.hard), ("best_cost", best)):
                history[name].append(value)
            history["time"].append(now - t_start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cost=f"{reached.soft:.4g}", best=f"{best:.4g}", refresh=False)
            last = now - (t_start + history["time"][-2]) if step > 1 else now - t_start
            if stopping.reason(best, now, last) is not None:
                break
    return best_perms, history, step


def stopping_for(plan: Plan, hints_of: Any, budget: float | None, min_stale: int, t_enter: float) -> Stopping:
    """The :class:`Stopping` of ``plan`` for a cost (its lower bound), with the warm start's time as budget
    where it applies (the refinement's setup counts against it: the clock starts at ``t_enter``)."""
    return Stopping(
        lower_bound=cost_hints(hints_of).lower_bound,
        patience=plan.patience,
        budget=budget if plan.budget_applies else None,
        min_stale=min_stale,
        t_best=t_enter,
    )
