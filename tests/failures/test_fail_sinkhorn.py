"""Sinkhorn on inputs where it cannot or did not converge: reported, never silently wrong."""

from __future__ import annotations

import warnings

import pytest
import torch

from rebasin_callbacks import sinkhorn
from rebasin_callbacks.sinkhorn import SinkhornConvergenceWarning, marginal_error


def test_extreme_temperature_and_scores_warn_and_stay_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    scores = 1e4 * torch.randn(32, 32, generator=g)
    with pytest.warns(SinkhornConvergenceWarning, match="off by"):
        P, info = sinkhorn(scores, tau=1e-6, return_info=True)
    assert not info.converged and info.error > 0.05
    assert info.error == pytest.approx(float(marginal_error(P)), abs=1e-6)
    # Entries of a (sub-)stochastic matrix: never the huge values of an overflowing scaling.
    assert float(P.max()) <= 1 + 1e-5 and float(P.min()) >= 0


def test_low_temperature_running_out_of_iterations_warns() -> None:
    g = torch.Generator().manual_seed(1)
    with pytest.warns(SinkhornConvergenceWarning, match="100 iterations"):
        _, info = sinkhorn(torch.randn(64, 64, generator=g), tau=0.01, return_info=True)
    assert info.iterations == 100 and not info.converged


def test_converged_output_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = sinkhorn(torch.randn(64, 64), tau=1.0, return_info=True)
    assert info.converged


def test_warning_can_be_switched_off() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P = sinkhorn(torch.randn(64, 64), tau=0.01, n_iters=3, warn=False)
    assert float(marginal_error(P)) > 0.05


@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_empty_batch_gives_an_empty_result(backward: str) -> None:
    scores = torch.zeros(0, 5, 5, requires_grad=True)
    P, info = sinkhorn(scores, backward=backward, return_info=True)  # type: ignore[call-overload]
    assert P.shape == (0, 5, 5) and info.iterations == 0
    (grad,) = torch.autograd.grad(P.sum(), scores, allow_unused=True)
    assert grad is None or grad.shape == (0, 5, 5)


def test_scores_over_tau_overflowing_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="tau"):
        sinkhorn(torch.full((3, 3), 1e30), tau=1e-10)


@pytest.mark.parametrize("check_every", [0, -1, 2.5])
def test_bad_check_interval_names_the_argument(check_every: object) -> None:
    with pytest.raises(ValueError, match="check_every"):
        sinkhorn(torch.zeros(3, 3), check_every=check_every)  # type: ignore[arg-type]
