"""Batched Sinkhorn normalisation with an implicit (fixed-point) gradient.

``sinkhorn(scores)`` maps square score matrices ``[..., n, n]`` to doubly-stochastic matrices
``P = diag(u) exp(scores / tau) diag(v)``. Three pieces, kept apart on purpose:

* the forward solver (:func:`_solve_potentials`): log-domain potentials for stability, with inner
  scaling iterations that only do matrix-vector products (no ``exp`` per iteration), falling back to a
  log-domain step whenever the scalings leave a safe range (Schmitzer's absorption trick);
* the implicit backward (:func:`implicit_grad`): differentiates the fixed point
  ``P 1 = 1, P^T 1 = 1`` (Eisenberger et al., CVPR 2022) through an ``n x n`` Schur complement instead of
  the dense ``(2n-1) x (2n-1)`` system, solved by conjugate gradients (matrix-vector products only) with a
  direct Cholesky fallback; its memory does not depend on the number of iterations;
* the unrolled reference (``backward="unrolled"``): plain autograd through log-domain iterations.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["sinkhorn", "implicit_grad", "dense_implicit_grad", "marginal_error"]

Backward = Literal["implicit", "unrolled"]
Solver = Literal["auto", "cg", "cholesky"]
# CG iterations allowed before the direct solve takes over: measured on CPU, about n/8 matrix-vector
# products cost as much as the direct solve's n^3 product and Cholesky.
_CG_MIN = 32
_CG_PER_ITER = 8
#: up to this size "auto" solves directly (measured: CG's fixed cost made n = 128 slower than the dense
#: reference when P is sharp; see BENCHMARKS.md)
_DIRECT_MAX_N = 128


def _check_inputs(log_alpha: Tensor, tau: float, n_iters: int, tol: float, backward: str) -> None:
    if not isinstance(log_alpha, Tensor):
        raise TypeError(f"log_alpha must be a torch.Tensor, got {type(log_alpha).__name__}")
    if log_alpha.ndim < 2 or log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"log_alpha must have shape [..., n, n] (square), got {tuple(log_alpha.shape)}")
    if log_alpha.shape[-1] == 0:
        raise ValueError("log_alpha must have n >= 1, got an empty matrix")
    if not log_alpha.is_floating_point():
        raise TypeError(f"log_alpha must be a floating-point tensor, got {log_alpha.dtype}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if not (isinstance(n_iters, int) and n_iters >= 1):
        raise ValueError(f"n_iters must be an int >= 1, got {n_iters!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if backward not in ("implicit", "unrolled"):
        raise ValueError(f"backward must be 'implicit' or 'unrolled', got {backward!r}")
    if not bool(torch.isfinite(log_alpha).all()):
        bad = (~torch.isfinite(log_alpha)).nonzero()[0].tolist()
        raise ValueError(
            f"log_alpha contains NaN or inf (first at index {bad} of shape {tuple(log_alpha.shape)})"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision is too coarse for the marginals and the backward solve.
    return torch.float64 if dtype == torch.float64 else torch.float32


def marginal_error(P: Tensor) -> Tensor:
    """Largest deviation of any row or column sum of ``P`` from 1 (a scalar tensor)."""
    rows = (P.sum(-1) - 1).abs().amax()
    cols = (P.sum(-2) - 1).abs().amax()
    return torch.maximum(rows, cols)


@torch.no_grad()
def _solve_potentials(S: Tensor, n_iters: int, tol: float) -> tuple[Tensor, int]:
    """Return the doubly-stochastic ``P = exp(S + f 1^T + 1 g^T)`` and the iterations used.

    One iteration = one row plus one column normalisation. Rows are exact on return; the column error
    is below ``tol`` unless ``n_iters`` ran out.
    """
    # Scalings outside [1/bound, bound] are absorbed into the log potentials before they overflow.
    bound = 1e8 if S.dtype == torch.float32 else 1e60
    f = -torch.logsumexp(S, dim=-1)
    g = torch.zeros_like(f)
    it = 0
    while True:
        # A log-domain column step: always finite, whatever the scale of S.
        g = -torch.logsumexp(S + f.unsqueeze(-1), dim=-2)
        K = torch.exp(S + f.unsqueeze(-1) + g.unsqueeze(-2))
        u = torch.ones_like(f)
        v = torch.ones_like(g)
        while it < n_iters:
            it += 1
            u_new = torch.matmul(K, v.unsqueeze(-1)).squeeze(-1).reciprocal_()
            c = torch.matmul(u_new.unsqueeze(-2), K).squeeze(-2)  # column sums of K diag(v) scaled by u
            if not _in_range(u_new, bound) or not bool(torch.isfinite(c).all()):
                break
            u = u_new
            err = float((v * c - 1).abs().amax())
            if err <= tol:
                return K.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2)), it
            v_new = c.reciprocal_()
            if not _in_range(v_new, bound):
                break
            v = v_new
        else:
            return K.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2)), it
        # Absorb the last good scalings and re-normalise the rows in the log domain.
        f = f + torch.log(u)
        g = g + torch.log(v)
        f = -torch.logsumexp(S + g.unsqueeze(-2), dim=-1)
        if it >= n_iters:
            return torch.exp(S + f.unsqueeze(-1) + g.unsqueeze(-2)), it


def _in_range(x: Tensor, bound: float) -> bool:
    return bool(torch.isfinite(x).all()) and float(x.amax()) < bound and float(x.amin()) > 1.0 / bound


def _log_sinkhorn_unrolled(S: Tensor, n_iters: int, tol: float) -> Tensor:
    """Plain log-domain iterations under autograd (the reference the implicit gradient must match)."""
    log_p = S
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
        with torch.no_grad():
            err = float((torch.logsumexp(log_p, dim=-1).exp() - 1).abs().amax())
        if err <= tol:
            break
    return log_p.exp()


def implicit_grad(P: Tensor, grad_P: Tensor, *, solver: Solver = "auto") -> Tensor:
    """Gradient w.r.t. the scores ``S`` of a loss with gradient ``grad_P`` at the fixed point ``P``.

    With ``P = exp(S + u 1^T + 1 v^T)``, differentiating the marginal constraints gives
    ``dL/dS = P * (G - a 1^T - 1 b^T)`` where ``[[D_r, P], [P^T, D_c]] [a; b] = [(G*P) 1; (G*P)^T 1]`` and
    ``D_r, D_c`` hold P's row and column sums (both the identity at the fixed point; using the actual sums
    keeps the system positive semi-definite when the forward stopped early). Eliminating ``a`` leaves the
    ``n x n`` Schur complement ``(D_c - P^T D_r^-1 P) b = (G*P)^T 1 - P^T D_r^-1 (G*P) 1``, whose null
    space is the constant vector (the gauge ``u + c, v - c``), fixed by adding ``1 1^T / n``.

    Args:
        solver: ``"cg"`` conjugate gradients with matrix-vector products only (``O(n^2)`` memory and time
            per iteration; fast when P is far from a hard permutation); ``"cholesky"`` a direct solve
            (one ``n x n`` product and one Cholesky); ``"auto"`` (default) the direct solve up to
            ``n = 128``; above, CG up to about the direct solve's cost, then the direct solve if CG has
            not converged.
    """
    if solver not in ("auto", "cg", "cholesky"):
        raise ValueError(f"solver must be 'auto', 'cg' or 'cholesky', got {solver!r}")
    # Row and column sums of G*P without an n x n temporary.
    gu = torch.linalg.vecdot(grad_P, P, dim=-1)
    gv = torch.linalg.vecdot(grad_P, P, dim=-2)
    r = P.sum(-1)
    c = P.sum(-2)
    rhs = gv - torch.matmul((gu / r).unsqueeze(-2), P).squeeze(-2)
    b = None
    n = P.shape[-1]
    if solver == "auto" and n <= _DIRECT_MAX_N:
        solver = "cholesky"  # small n: one direct solve beats CG's per-iteration overhead
    if solver != "cholesky":
        max_iter = 10 * n if solver == "cg" else max(_CG_MIN, n // _CG_PER_ITER)
        b, converged = _schur_cg(P, r, c, rhs, max_iter=max_iter)
        if not converged and solver == "auto":
            b = None
    if b is None:
        b = _schur_direct(P, r, c, rhs)
    a = (gu - torch.matmul(P, b.unsqueeze(-1)).squeeze(-1)) / r
    out = torch.sub(grad_P, a.unsqueeze(-1))
    return out.sub_(b.unsqueeze(-2)).mul_(P)


def _schur_matvec(P: Tensor, r: Tensor, c: Tensor, x: Tensor) -> Tensor:
    n = P.shape[-1]
    Px = torch.matmul(P, x.unsqueeze(-1)).squeeze(-1)
    PtPx = torch.matmul((Px / r).unsqueeze(-2), P).squeeze(-2)
    return c * x - PtPx + x.sum(-1, keepdim=True) / n


def _schur_cg(P: Tensor, r: Tensor, c: Tensor, rhs: Tensor, *, max_iter: int) -> tuple[Tensor, bool]:
    """Batched conjugate gradients on the Schur complement; stops when every relative residual is small."""
    rtol = 1e-6 if P.dtype == torch.float32 else 1e-12
    tiny = torch.finfo(P.dtype).tiny
    x = torch.zeros_like(rhs)
    res = rhs.clone()
    p = res.clone()
    rs = (res * res).sum(-1, keepdim=True)
    stop = (rtol**2) * rs.clamp_min(tiny)
    for it in range(1, max_iter + 1):
        Ap = _schur_matvec(P, r, c, p)
        alpha = rs / (p * Ap).sum(-1, keepdim=True).clamp_min(tiny)
        x.add_(alpha * p)
        res.sub_(alpha * Ap)
        rs_new = (res * res).sum(-1, keepdim=True)
        if it % 4 == 0 or it == max_iter:  # a host sync every few iterations, not every one
            if bool((rs_new <= stop).all()):
                return x, True
            if not bool(torch.isfinite(rs_new).all()):
                return x, False
        p = res + (rs_new / rs.clamp_min(tiny)) * p
        rs = rs_new
    return x, False


def _schur_direct(P: Tensor, r: Tensor, c: Tensor, rhs: Tensor) -> Tensor:
    n = P.shape[-1]
    # M = D_c + 11^T/n - P^T D_r^-1 P, symmetric: (D_r^-1/2 P)^T (D_r^-1/2 P); two n x n buffers at most.
    Q = P / r.sqrt().unsqueeze(-1)
    M = torch.matmul(Q.transpose(-1, -2), Q).neg_().add_(1.0 / n)
    del Q
    M.diagonal(dim1=-2, dim2=-1).add_(c)
    L, info = torch.linalg.cholesky_ex(M)
    if not bool((info == 0).all()):
        # Semi-definite to rounding (P almost a hard permutation): a ridge far below the spectrum's scale
        # only touches the near-null directions, whose entries of P are themselves negligible.
        ridge = (1e-5 if P.dtype == torch.float32 else 1e-11) * c.amax(-1, keepdim=True)
        M.diagonal(dim1=-2, dim2=-1).add_(ridge)
        L, info = torch.linalg.cholesky_ex(M)
        if not bool((info == 0).all()):
            return torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
    del M
    return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)


def dense_implicit_grad(P: Tensor, grad_P: Tensor) -> Tensor:
    """The published formulation: solve the dense ``(2n-1) x (2n-1)`` system (reference for tests and
    benchmarks only; :func:`implicit_grad` computes the same thing far more cheaply)."""
    n = P.shape[-1]
    batch = P.shape[:-2]
    eye = torch.eye(n, dtype=P.dtype, device=P.device).expand(*batch, n, n)
    A = torch.cat([torch.cat([eye, P], -1), torch.cat([P.transpose(-1, -2), eye], -1)], -2)
    A = A[..., :-1, :-1]  # drop one constraint to remove the gauge freedom
    GP = grad_P * P
    rhs = torch.cat([GP.sum(-1), GP.sum(-2)[..., :-1]], -1)
    sol = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)
    a = sol[..., :n]
    b = torch.cat([sol[..., n:], torch.zeros_like(sol[..., :1])], -1)
    return P * (grad_P - a.unsqueeze(-1) - b.unsqueeze(-2))


class _ImplicitSinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S: Tensor, n_iters: int, tol: float) -> Tensor:  # type: ignore[override]
        P, _ = _solve_potentials(S, n_iters, tol)
        ctx.save_for_backward(P)
        return P

    @staticmethod
    def backward(ctx, grad_P: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (P,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return implicit_grad(P, grad_P.to(P.dtype)), None, None


def sinkhorn(
    log_alpha: Tensor,
    *,
    tau: float = 1.0,
    n_iters: int = 100,
    tol: float = 1e-5,
    backward: Backward = "implicit",
) -> Tensor:
    """Normalise square score matrices to doubly-stochastic matrices, differentiably.

    Args:
        log_alpha: scores of shape ``[..., n, n]`` (any batch dimensions, any device).
        tau: temperature; ``exp(log_alpha / tau)`` is normalised. Smaller is closer to a permutation.
        n_iters: most row+column normalisation rounds.
        tol: stop once every row and column sums to 1 within ``tol``.
        backward: ``"implicit"`` (fixed-point gradient, memory independent of ``n_iters``) or
            ``"unrolled"`` (autograd through the iterations; the reference).

    Returns:
        A tensor of the same shape whose rows and columns each sum to 1. It has the input's dtype,
        except that half precision is computed and returned in float32.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import sinkhorn
        >>> scores = torch.randn(4, 8, 8, requires_grad=True)
        >>> P = sinkhorn(scores, tau=0.1)
        >>> bool(torch.allclose(P.sum(-1), torch.ones(4, 8), atol=1e-4))
        True
        >>> P.pow(2).sum().backward()  # implicit gradient
        >>> scores.grad.shape
        torch.Size([4, 8, 8])
    """
    _check_inputs(log_alpha, tau, n_iters, tol, backward)
    dtype = _compute_dtype(log_alpha.dtype)
    S = log_alpha.to(dtype) / tau
    if backward == "unrolled":
        return _log_sinkhorn_unrolled(S, n_iters, tol)
    return _ImplicitSinkhorn.apply(S, n_iters, float(tol))
