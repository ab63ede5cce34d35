"""A cost describes itself (CostHints, an optional closed-form gradient); align's loop stops by named rules."""

from __future__ import annotations

import time

import torch
from _align_models import mlp, mlp_spec

from rebasin_callbacks import align, permute, random_permutations
from rebasin_callbacks.align import ALIGN_START, _plan
from rebasin_callbacks.costs import CostHints, L2Cost, MidCost, cost_hints
from rebasin_callbacks.refine import Stopping


def _pair(seed: int = 0):
    ref = mlp([6, 16, 16, 3], normal_init=True, seed=seed)
    spec = mlp_spec(ref)
    model = permute(ref, spec, random_permutations(spec, seed=seed))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return model, ref, spec


def test_hints_of_plain_callables_and_built_ins() -> None:
    def plain(view, ref, batch):
        return torch.zeros(())

    plain.needs_data = True  # type: ignore[attr-defined]
    assert cost_hints(plain) == CostHints(needs_data=True)
    assert cost_hints(MidCost(torch.nn.functional.cross_entropy)).tau == 0.5
    assert cost_hints(L2Cost()).polish and cost_hints(L2Cost()).lower_bound == 0.0


def test_every_auto_is_resolved_once_from_the_hints() -> None:
    hints = CostHints(needs_data=True, tau=0.25, method="anneal", patience=7)
    plan = _plan(
        ALIGN_START,
        hints,
        init="identity",
        lr="auto",
        method="auto",
        steps=10,
        early_stopping="auto",
        polish="auto",
    )
    assert (plan.method, plan.settings.tau, plan.patience, plan.polish, plan.lr) == (
        "anneal",
        0.25,
        7,
        False,
        0.1,
    )
    assert plan.settings.init_scale == "auto" and not plan.budget_applies
    ste = _plan(ALIGN_START, CostHints(polish=True), init="weight_matching", lr="auto", method="auto", steps=10,
                early_stopping=None, polish="auto")  # fmt: skip
    assert (ste.method, ste.settings.tau, ste.settings.init_scale, ste.lr, ste.polish, ste.patience) == (
        "ste",
        1.0,
        1.0,
        0.3,
        True,
        None,
    )


class _Flat:
    """A constant cost (with a gradient): no step can improve on the start."""

    hints = CostHints(patience=3, probe=False)

    def __call__(self, view, reference, batch):
        return sum((v * 0).sum() for v in view.parameters().values()) + 1.0


def test_a_user_costs_patience_stops_the_search() -> None:
    model, ref, spec = _pair()
    result = align(model, ref, spec=spec, cost=_Flat(), init="identity", steps=50, progress=False, seed=0)
    assert result.steps == 3


class _CountedL2(L2Cost):
    """L2 by another class: it offers the closed form too, counted."""

    def __init__(self) -> None:
        self.calls = 0

    def closed_form_gradient(self, model, reference, spec, problem):
        gradient = super().closed_form_gradient(model, reference, spec, problem)
        assert gradient is not None

        def counted(perms):
            self.calls += 1
            return gradient(perms)

        return counted


def test_a_closed_form_gradient_offered_by_a_cost_is_used_and_gives_the_same_search() -> None:
    model, ref, spec = _pair(1)
    kw = dict(spec=spec, init="identity", steps=12, early_stopping=None, progress=False, seed=0)
    counted = _CountedL2()
    a = align(model, ref, cost=counted, **kw)
    b = align(model, ref, cost="l2", **kw)
    assert counted.calls == 12
    assert a.history["cost"] == b.history["cost"]
    assert all(torch.equal(a.perms[g], b.perms[g]) for g in a.perms)


def test_stopping_rules_are_named() -> None:
    stop = Stopping(lower_bound=0.0, patience=2, budget=None)
    assert stop.reason(0.0, 0.0, 0.0) == "converged"
    stop.record(hard=1.0, best=1.0)
    assert stop.reason(1.0, 0.0, 0.0) is None
    stop.record(hard=1.0, best=1.0)
    assert stop.reason(1.0, 0.0, 0.0) == "exhausted"
    stop.record(hard=0.5, best=1.0)  # a significant gain resets the count
    assert stop.stale == 0 and stop.reason(0.5, 0.0, 0.0) is None
    timed = Stopping(
        lower_bound=None, patience=100, budget=0.5, min_stale=1, t_best=time.perf_counter() - 1.0
    )
    timed.record(hard=1.0, best=1.0)
    assert timed.reason(1.0, time.perf_counter(), 0.1) == "over_budget"
