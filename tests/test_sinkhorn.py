"""The Sinkhorn core: marginals, stability, and gradients (implicit == unrolled == finite differences)."""

from __future__ import annotations

import pytest
import torch

from rebasin_callbacks import sinkhorn
from rebasin_callbacks.sinkhorn import (
    SinkhornConvergenceWarning,
    _solve_potentials,
    dense_implicit_grad,
    implicit_grad,
    marginal_error,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_gradcheck_float64(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(2, n, n, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: sinkhorn(s, tau=0.7, n_iters=5000, tol=1e-13), (scores,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_implicit_matches_unrolled_once_converged(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 12, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.randn(3, 12, 12, dtype=torch.float64, generator=g)
    grads = {}
    for backward in ("implicit", "unrolled"):
        P = sinkhorn(scores, tau=tau, n_iters=10_000, tol=1e-13, backward=backward)
        (grads[backward],) = torch.autograd.grad((P * weights).sum(), scores)
    scale = grads["unrolled"].abs().max()
    assert scale > 1e-3  # the comparison below must be able to fail
    assert (grads["implicit"] - grads["unrolled"]).abs().max() <= 1e-8 * max(1.0, float(scale))


def test_unrolled_differs_before_convergence() -> None:
    # With 2 iterations the unrolled gradient is not the fixed point's: the test above is informative.
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(10, 10, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.randn(10, 10, dtype=torch.float64, generator=g)
    P_i = sinkhorn(scores, tau=0.2, n_iters=10_000, tol=1e-13)
    P_u = sinkhorn(scores, tau=0.2, n_iters=2, tol=0, backward="unrolled", warn=False)
    (g_i,) = torch.autograd.grad((P_i * weights).sum(), scores)
    (g_u,) = torch.autograd.grad((P_u * weights).sum(), scores)
    assert (g_i - g_u).abs().max() > 1e-3


@pytest.mark.parametrize("solver", ["auto", "cg", "cholesky"])
@pytest.mark.parametrize("tau", [1.0, 0.3])
@pytest.mark.parametrize("n", [3, 17, 64])
def test_schur_complement_equals_dense_system(n: int, tau: float, solver: str) -> None:
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(4, n, n, dtype=torch.float64, generator=g)
    P = sinkhorn(scores, tau=tau, n_iters=20_000, tol=1e-12)
    assert float(marginal_error(P)) < 1e-11  # both formulations are exact only at the fixed point
    grad_P = torch.randn(4, n, n, dtype=torch.float64, generator=g)
    ours = implicit_grad(P, grad_P, solver=solver)  # type: ignore[arg-type]
    dense = dense_implicit_grad(P, grad_P)
    assert float(dense.abs().max()) > 1e-3
    assert float((ours - dense).abs().max()) <= 1e-7 * float(dense.abs().max())


def _count_solver_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    import importlib

    sk = importlib.import_module("rebasin_callbacks.sinkhorn")  # the package exports a function of that name

    calls = {"cg": 0, "direct": 0}
    cg, direct = sk._schur_cg, sk._schur_direct

    def counted_cg(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["cg"] += 1
        return cg(*args, **kwargs)

    def counted_direct(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["direct"] += 1
        return direct(*args, **kwargs)

    monkeypatch.setattr(sk, "_schur_cg", counted_cg)
    monkeypatch.setattr(sk, "_schur_direct", counted_direct)
    return calls


def test_auto_solver_falls_back_when_cg_cannot_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    # A very sharp P makes the Schur complement nearly singular: CG hits its cap, the direct solve answers.
    # n must exceed the size up to which "auto" solves directly, or CG is never tried.
    n = 160
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(n, n, dtype=torch.float64, generator=g)
    P = sinkhorn(scores, tau=0.02, n_iters=2_000, tol=1e-12)
    grad_P = torch.randn(n, n, dtype=torch.float64, generator=g)
    direct = implicit_grad(P, grad_P, solver="cholesky")
    calls = _count_solver_calls(monkeypatch)
    auto = implicit_grad(P, grad_P, solver="auto")
    assert calls == {"cg": 1, "direct": 1}
    assert torch.allclose(auto, direct, atol=1e-10)
    assert bool(torch.isfinite(auto).all())


def test_auto_solver_small_n_is_direct_and_large_diffuse_n_is_cg(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    calls = _count_solver_calls(monkeypatch)
    for n, expected in ((64, {"cg": 0, "direct": 1}), (192, {"cg": 1, "direct": 0})):
        calls.update(cg=0, direct=0)
        P = sinkhorn(torch.randn(n, n, dtype=torch.float64, generator=g), tau=1.0, n_iters=2_000, tol=1e-12)
        grad_P = torch.randn(n, n, dtype=torch.float64, generator=g)
        auto = implicit_grad(P, grad_P, solver="auto")
        assert calls == expected, (n, calls)
        torch.testing.assert_close(auto, dense_implicit_grad(P, grad_P), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8), (2, 3, 16, 16)])
def test_marginals_within_tol_any_batch(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(*shape, dtype=dtype, generator=g).to(device)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    P = sinkhorn(scores, tau=0.5, n_iters=10_000, tol=tol)
    assert P.shape == scores.shape and P.dtype == dtype and P.device.type == device
    assert float(marginal_error(P)) <= 2 * tol
    assert bool((P >= 0).all())


def test_batch_elements_are_independent() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 9, 9, dtype=torch.float64, generator=g)
    batched = sinkhorn(scores, tau=0.4, n_iters=10_000, tol=1e-12)
    single = torch.stack([sinkhorn(s, tau=0.4, n_iters=10_000, tol=1e-12) for s in scores])
    assert torch.allclose(batched, single, atol=1e-9)


def test_small_temperature_large_scores_stay_finite() -> None:
    g = torch.Generator().manual_seed(0)
    scores = 1e3 * torch.randn(4, 32, 32, generator=g)
    scores.requires_grad_(True)
    with pytest.warns(SinkhornConvergenceWarning):  # 100 iterations are far too few at this scale
        P = sinkhorn(scores, tau=1e-3)
    assert bool(torch.isfinite(P).all())
    (P * torch.randn_like(P)).sum().backward()
    assert scores.grad is not None and bool(torch.isfinite(scores.grad).all())


def test_converges_to_the_permutation_of_a_dominant_assignment() -> None:
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    scores = torch.zeros(20, 20)
    scores[torch.arange(20), perm] = 5.0
    P = sinkhorn(scores, tau=0.05)
    assert torch.equal(P.argmax(-1), perm)
    assert float(P.max(-1).values.min()) > 0.99


def test_half_precision_input_is_computed_in_float32() -> None:
    scores = torch.randn(6, 6).to(torch.bfloat16)
    P = sinkhorn(scores, tau=0.5)
    assert P.dtype == torch.float32
    assert float(marginal_error(P)) < 1e-4


def test_implicit_memory_does_not_keep_iterations() -> None:
    # The autograd graph of the implicit version holds one saved tensor (P), whatever n_iters is.
    scores = torch.randn(16, 16, requires_grad=True)
    P = sinkhorn(scores, tau=0.1, n_iters=500, tol=0)
    saved = P.grad_fn.saved_tensors  # type: ignore[union-attr]
    assert len(saved) == 1 and saved[0].shape == (16, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_alpha": torch.zeros(3, 4)}, "square"),
        ({"log_alpha": torch.zeros(4)}, "square"),
        ({"log_alpha": torch.tensor([[0.0, float("nan")], [0.0, 0.0]])}, "NaN or inf"),
        ({"log_alpha": torch.tensor([[0.0, float("inf")], [0.0, 0.0]])}, "NaN or inf"),
        ({"log_alpha": torch.zeros(3, 3), "tau": 0.0}, "tau"),
        ({"log_alpha": torch.zeros(3, 3), "tau": -1.0}, "tau"),
        ({"log_alpha": torch.zeros(3, 3), "n_iters": 0}, "n_iters"),
        ({"log_alpha": torch.zeros(3, 3), "backward": "magic"}, "backward"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, match: str) -> None:
    log_alpha = kwargs.pop("log_alpha")
    with pytest.raises(ValueError, match=match):
        sinkhorn(log_alpha, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 64, 64, dtype=torch.float64, generator=g)
    weights = torch.randn(3, 64, 64, dtype=torch.float64, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        s = scores.to(device).requires_grad_(True)
        P = sinkhorn(s, tau=0.3, n_iters=10_000, tol=1e-12)
        (grad,) = torch.autograd.grad((P * weights.to(device)).sum(), s)
        results.append((P.cpu(), grad.cpu()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-9)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)


def test_implicit_gradient_is_stable_when_the_forward_stopped_early() -> None:
    # 20 iterations at a small temperature leave the columns far from 1. The Schur system built on P's
    # actual marginals stays positive semi-definite: float32 agrees with float64 on the same P.
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(256, 256, generator=g) / 0.05
    grad_P = torch.randn(256, 256, generator=g)
    P32 = sinkhorn(scores, n_iters=20, tol=0, warn=False)
    assert float(marginal_error(P32)) > 1e-2  # really not converged
    P64 = sinkhorn(scores.double(), n_iters=20, tol=0, warn=False)
    ref = implicit_grad(P64, grad_P.double(), solver="cholesky")
    for solver in ("auto", "cg", "cholesky"):
        ours = implicit_grad(P32, grad_P, solver=solver)  # type: ignore[arg-type]
        assert bool(torch.isfinite(ours).all())
        assert float((ours.double() - ref).norm() / ref.norm()) < 1e-3
    # The published dense system assumes unit marginals: on the same P its gradient is far off.
    dense = dense_implicit_grad(P32, grad_P)
    assert not bool(torch.isfinite(dense).all()) or float((dense.double() - ref).norm() / ref.norm()) > 0.1


class _ReadBackCounter:
    """Counts every read of a tensor's value into Python (each one waits for the device)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("tau", [1.0, 1e-3])
def test_forward_reads_back_once_per_check_not_per_iteration(
    monkeypatch: pytest.MonkeyPatch, tau: float
) -> None:
    g = torch.Generator().manual_seed(0)
    S = torch.randn(3, 48, 48, generator=g) * (1e3 if tau < 1 else 1.0) / tau
    counter = _ReadBackCounter(monkeypatch)
    _, iters, absorptions, _ = _solve_potentials(S, 96, 0.0, 8)
    assert iters == 96
    # 96 / 8 = 12 checks in a calm run; each absorption adds a short block (1, 2, 4 iterations, ...).
    assert counter.count <= 12 + 4 * absorptions
    if tau < 1:
        assert absorptions > 0  # the extreme case exercises the absorption path


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_check_interval_changes_nothing_but_the_iteration_count(check_every: int) -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 40, 40, dtype=torch.float64, generator=g)
    ref = sinkhorn(scores, tau=0.3, n_iters=10_000, tol=1e-12, check_every=1)
    P, info = sinkhorn(scores, tau=0.3, n_iters=10_000, tol=1e-12, check_every=check_every, return_info=True)
    assert info.converged and info.iterations % check_every == 0
    assert float((P - ref).abs().max()) < 1e-10


def test_columns_are_exact_and_rows_carry_the_error() -> None:
    g = torch.Generator().manual_seed(4)
    P, info = sinkhorn(torch.randn(64, 64, generator=g), tau=0.02, n_iters=10, warn=False, return_info=True)
    rows = float((P.sum(-1) - 1).abs().max())
    cols = float((P.sum(-2) - 1).abs().max())
    assert cols < 1e-5 < rows
    assert info.error == pytest.approx(rows) and not info.converged and info.iterations == 10


def test_info_reports_convergence() -> None:
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 32, 32, generator=g, requires_grad=True)
    P, info = sinkhorn(scores, tau=0.5, return_info=True)
    assert info.converged and 0 < info.iterations < 100 and info.absorptions == 0
    assert info.error == pytest.approx(float(marginal_error(P.detach())), abs=1e-6)
    assert info.error <= 1e-5
    P.sum().backward()  # the info does not get in autograd's way
    assert scores.grad is not None


def test_unrolled_reference_reports_too() -> None:
    P, info = sinkhorn(torch.randn(16, 16), tau=0.5, backward="unrolled", return_info=True)
    assert info.converged and info.error == pytest.approx(float(marginal_error(P.detach())))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backward_solves_directly_and_matches_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(512, 512, dtype=torch.float64, generator=g).cuda()
    P = sinkhorn(scores, tau=1.0, n_iters=2_000, tol=1e-12)
    grad_P = torch.randn(512, 512, dtype=torch.float64, generator=g).cuda()
    calls = _count_solver_calls(monkeypatch)
    ours = implicit_grad(P, grad_P)
    assert calls == {"cg": 0, "direct": 1}
    torch.testing.assert_close(ours, dense_implicit_grad(P, grad_P), atol=1e-8, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_reads_back_once_per_check(monkeypatch: pytest.MonkeyPatch) -> None:
    S = torch.randn(1024, 1024, device="cuda")
    counter = _ReadBackCounter(monkeypatch)
    _, iters, absorptions, _ = _solve_potentials(S, 64, 0.0)
    assert iters == 64 and absorptions == 0
    assert counter.count <= 64 // 8
