"""One settings object for the Sinkhorn relaxation: validated once, the same through every entry point."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _align_models import mlp, mlp_spec

from rebasin_callbacks import ReBasin, SinkhornSettings, align, permute, random_permutations
from rebasin_callbacks.incremental import EPISODE_START, ReBasinIncremental


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("tau", 0.0, "tau must be a number in"),
        ("tau", 1e-4, "tau must be a number in"),
        ("tau", float("nan"), "tau must be a number in"),
        ("n_iters", 0, "n_iters must be an int >= 1"),
        ("tol", -1.0, "tol must be a finite number >= 0"),
        ("init_scale", float("inf"), "init_scale must be a finite number or 'auto'"),
        ("init_noise", -0.1, "init_noise must be a finite number >= 0"),
        ("backward", "autograd", "backward must be 'implicit' or 'unrolled'"),
    ],
)
def test_bad_values_are_refused_at_construction_naming_the_field(field, value, match) -> None:
    with pytest.raises(ValueError, match=match):
        SinkhornSettings(**{field: value})


def test_settings_are_frozen_and_merged_returns_a_copy() -> None:
    s = SinkhornSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tau = 2.0  # type: ignore[misc]
    t = s.merged(tau=2.0, n_iters=None)
    assert (t.tau, t.n_iters, s.tau) == (2.0, 20, 1.0)
    with pytest.raises(TypeError, match="no field"):
        s.merged(temperature=3.0)


def test_one_rule_for_tau_everywhere() -> None:
    model = mlp([4, 8, 3], seed=0)
    spec = mlp_spec(model)
    for call in (
        lambda: ReBasin(model, spec, tau=1e-4),
        lambda: ReBasinIncremental(model, spec=spec, tau=1e-4),
        lambda: align(model, model, spec=spec, tau=1e-4, progress=False),
    ):
        with pytest.raises(ValueError, match=r"tau must be a number in \[0.001, 1000.0\]"):
            call()


def test_keywords_build_the_same_settings_object() -> None:
    model = mlp([4, 8, 3], seed=0)
    spec = mlp_spec(model)
    by_kw = ReBasin(model, spec, tau=0.5, n_iters=7, init_noise=0.0, seed=1)
    by_obj = ReBasin(model, spec, settings=SinkhornSettings(tau=0.5, n_iters=7, init_noise=0.0, seed=1))
    assert by_kw.settings == by_obj.settings
    assert all(torch.equal(by_kw.scores[b], by_obj.scores[b]) for b in by_kw.scores)
    # a keyword given on top of a settings object wins
    assert ReBasin(model, spec, settings=SinkhornSettings(tau=0.5), tau=2.0).tau == 2.0
    inc = ReBasinIncremental(model, spec=spec, tau=0.5)
    assert inc.settings == EPISODE_START.merged(tau=0.5)


def test_align_gives_identical_results_from_keywords_and_from_settings() -> None:
    ref = mlp([6, 16, 16, 3], normal_init=True, seed=0)
    spec = mlp_spec(ref)
    model = permute(ref, spec, random_permutations(spec, seed=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    common = dict(spec=spec, progress=False, steps=15, early_stopping=None, init="identity", method="soft")
    a = align(model, ref, tau=0.7, n_iters=30, init_noise=0.05, seed=3, **common)
    settings = SinkhornSettings(tau=0.7, n_iters=30, init_noise=0.05, init_scale="auto", seed=3)
    b = align(model, ref, settings=settings, **common)
    assert a.history["cost"] == b.history["cost"] and len(a.history["cost"]) == 15
    assert all(torch.equal(a.perms[g], b.perms[g]) for g in a.perms)
