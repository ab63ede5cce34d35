"""Batched Sinkhorn normalisation with an implicit (fixed-point) gradient.

``sinkhorn(scores)`` maps square score matrices ``[..., n, n]`` to doubly-stochastic matrices
``P = diag(u) exp(scores / tau) diag(v)``. Three pieces, kept apart on purpose:

* the forward solver (:func:`_solve_potentials`): log-domain potentials for stability, with inner
  scaling iterations that only do matrix-vector products (no ``exp`` per iteration) and never wait for
  the device: the scalings are clamped to a safe range on the device, and only every ``check_every``
  iterations one small read-back decides whether to stop (marginal error below ``tol``) or to absorb
  the scalings into the log potentials (Schmitzer's absorption trick);
* the implicit backward (:func:`implicit_grad`): differentiates the fixed point
  ``P 1 = 1, P^T 1 = 1`` (Eisenberger et al., CVPR 2022) through an ``n x n`` Schur complement instead of
  the dense ``(2n-1) x (2n-1)`` system, solved by conjugate gradients (matrix-vector products only) with a
  direct Cholesky fallback on the CPU, directly (one Cholesky) on accelerators; its memory does not depend
  on the number of iterations;
* the unrolled reference (``backward="unrolled"``): plain autograd through log-domain iterations.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor

__all__ = [
    "sinkhorn",
    "SinkhornInfo",
    "SinkhornConvergenceWarning",
    "implicit_grad",
    "dense_implicit_grad",
    "marginal_error",
]

Backward = Literal["implicit", "unrolled"]
Solver = Literal["auto", "cg", "cholesky"]
# CG iterations allowed before the direct solve takes over: measured on CPU, about n/8 matrix-vector
# products cost as much as the direct solve's n^3 product and Cholesky.
_CG_MIN = 32
_CG_PER_ITER = 8
#: up to this size "auto" solves directly (measured: CG's fixed cost made n = 128 slower than the dense
#: reference when P is sharp; see BENCHMARKS.md)
_DIRECT_MAX_N = 128
#: iterations between two convergence checks (each check reads one number back from the device). On a
#: GPU an iteration is ~6 kernel launches (tens of microseconds at any n <= 4096) and a read-back drains
#: the launch queue: checking every 8 iterations keeps that drain under ~10% of the loop while wasting at
#: most 7 iterations after convergence. On the CPU a read-back is free and an iteration of a large matrix
#: is not, so it checks every 2 (every iteration would add ~5 tensor operations per iteration).
_CHECK_EVERY = {"cpu": 2}
_CHECK_EVERY_DEFAULT = 8
#: a returned matrix whose row or column sums are off by more than this triggers
#: :class:`SinkhornConvergenceWarning` (the marginal error is always available with ``return_info=True``)
WARN_ERROR = 0.05


class SinkhornConvergenceWarning(RuntimeWarning):
    """:func:`sinkhorn` returned a matrix whose rows or columns do not sum to 1 (it did not converge)."""


@dataclass(frozen=True)
class SinkhornInfo:
    """What the forward solver achieved (``sinkhorn(..., return_info=True)``).

    Attributes:
        iterations: scaling iterations run (row + column normalisation each).
        error: largest ``|row sum - 1|`` of the returned matrix over the batch (its columns sum to 1 to
            rounding; the unrolled reference reports rows and columns).
        converged: ``error <= max(tol, rounding)``: the stopping criterion was met.
        absorptions: times the scalings were absorbed into the log potentials (extreme scores or tau).
    """

    iterations: int
    error: float
    converged: bool
    absorptions: int


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision is too coarse for the marginals and the backward solve.
    return torch.float64 if dtype == torch.float64 else torch.float32


def marginal_error(P: Tensor) -> Tensor:
    """Largest deviation of any row or column sum of ``P`` from 1 (a scalar tensor)."""
    rows = (P.sum(-1) - 1).abs().amax()
    cols = (P.sum(-2) - 1).abs().amax()
    return torch.maximum(rows, cols)


def _check_every(device: torch.device) -> int:
    return _CHECK_EVERY.get(device.type, _CHECK_EVERY_DEFAULT)


@torch.no_grad()
def _solve_potentials(
    S: Tensor, n_iters: int, tol: float, check_every: int | None = None
) -> tuple[Tensor, int, int, Tensor]:
    """Return the doubly-stochastic ``P = exp(S + f 1^T + 1 g^T)``, the iterations, the absorptions and
    P's largest ``|row sum - 1|`` (a 0-dim tensor on P's device: reading it is the caller's choice).

    One iteration = one row plus one column normalisation; the last step is a column normalisation, so
    columns are exact (to rounding) on return and rows are within ``tol`` unless ``n_iters`` ran out.
    Inside a block of ``check_every`` iterations nothing is read back from the device.
    """
    k_max = check_every or _check_every(S.device)
    # Scalings are clamped to [lo, hi] on the device, which keeps every product finite (K's entries are at
    # most 1 after the log-domain column step). A scaling at the clamp is absorbed into the log potentials
    # at the next check and the block after it is short, so extreme scores cost syncs, never accuracy.
    hi = 1e8 if S.dtype == torch.float32 else 1e60
    lo = 1.0 / hi
    f = -torch.logsumexp(S, dim=-1)
    it = absorptions = 0
    k = k_max
    while True:
        # A log-domain column step: always finite, whatever the scale of S.
        g = -torch.logsumexp(S + f.unsqueeze(-1), dim=-2)
        K = torch.exp(S + f.unsqueeze(-1) + g.unsqueeze(-2))
        if it >= n_iters:  # the budget ran out during absorptions: K has exact columns
            return K, it, absorptions, (K.sum(-1) - 1).abs().amax()
        u = torch.ones_like(f)
        v = torch.ones_like(g)
        while True:
            v_prev = c = v
            block = min(k, n_iters - it)
            for _ in range(block):
                u = torch.matmul(K, v.unsqueeze(-1)).squeeze(-1).reciprocal_().clamp_(lo, hi)
                c = torch.matmul(u.unsqueeze(-2), K).squeeze(-2)  # column sums of diag(u) K
                v_prev = v
                v = c.reciprocal().clamp_(lo, hi)
            it += block
            # The one read-back of the block: the column error of the iterate (u, v_prev), whose rows
            # are exact, and whether any scaling sits at the clamp.
            err = (v_prev * c - 1).abs().amax()
            big = torch.maximum(u.amax(), v.amax())
            small = torch.minimum(u.amin(), v.amin())
            err_h, big_h, small_h = torch.stack([err, big, small]).tolist()
            if not (big_h < hi and small_h > lo):
                break
            if err_h <= tol or it >= n_iters:
                # Rows of diag(u) K diag(v): one more product, cheaper than summing P's rows.
                row_err = (torch.matmul(K, v.unsqueeze(-1)).squeeze(-1).mul_(u) - 1).abs().amax()
                return K.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2)), it, absorptions, row_err
            k = min(2 * k, k_max)
        # Absorb the scalings and re-normalise the rows in the log domain; check often until it is calm.
        absorptions += 1
        k = 1
        f = f + torch.log(u)
        g = g + torch.log(v)
        f = -torch.logsumexp(S + g.unsqueeze(-2), dim=-1)


def _log_sinkhorn_unrolled(
    S: Tensor, n_iters: int, tol: float, check_every: int | None = None
) -> tuple[Tensor, int]:
    """Plain log-domain iterations under autograd (the reference the implicit gradient must match)."""
    k = check_every or _check_every(S.device)
    log_p = S
    it = 0
    for it in range(1, n_iters + 1):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
        if tol > 0 and it % k == 0:  # a read-back every k iterations, as in the forward solver
            with torch.no_grad():
                err = float((torch.logsumexp(log_p, dim=-1).exp() - 1).abs().amax())
            if err <= tol:
                break
    return log_p.exp(), it


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
            (one ``n x n`` product and one Cholesky); ``"auto"`` (default) the direct solve on any
            device other than the CPU, and on the CPU up to ``n = 128``; above, CG up to about the direct
            solve's cost, then the direct solve if CG has not converged.
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
    if solver == "auto" and (n <= _DIRECT_MAX_N or P.device.type != "cpu"):
        # Small n: one direct solve beats CG's per-iteration overhead. On an accelerator the n^3 product
        # and Cholesky are a few large kernels, while CG is hundreds of small ones with read-backs.
        solver = "cholesky"
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
    def forward(  # type: ignore[override]
        ctx, S: Tensor, n_iters: int, tol: float, check_every: int | None, stats: list[Any]
    ) -> Tensor:
        P, it, absorptions, row_err = _solve_potentials(S, n_iters, tol, check_every)
        stats.extend((it, absorptions, row_err))
        ctx.save_for_backward(P)
        return P

    @staticmethod
    def backward(ctx, grad_P: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        (P,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return implicit_grad(P, grad_P.to(P.dtype)), None, None, None, None


@overload
def sinkhorn(
    log_alpha: Tensor,
    *,
    tau: float = ...,
    n_iters: int = ...,
    tol: float = ...,
    backward: Backward = ...,
    check_every: int | None = ...,
    warn: bool = ...,
    return_info: Literal[False] = ...,
) -> Tensor: ...


@overload
def sinkhorn(
    log_alpha: Tensor,
    *,
    tau: float = ...,
    n_iters: int = ...,
    tol: float = ...,
    backward: Backward = ...,
    check_every: int | None = ...,
    warn: bool = ...,
    return_info: Literal[True],
) -> tuple[Tensor, SinkhornInfo]: ...


def sinkhorn(
    log_alpha: Tensor,
    *,
    tau: float = 1.0,
    n_iters: int = 100,
    tol: float = 1e-5,
    backward: Backward = "implicit",
    check_every: int | None = None,
    warn: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, SinkhornInfo]:
    """Normalise square score matrices to doubly-stochastic matrices, differentiably.

    Args:
        log_alpha: scores of shape ``[..., n, n]`` (any batch dimensions, any device). A batch of zero
            matrices (e.g. ``[0, n, n]``) gives an empty result of the same shape.
        tau: temperature; ``exp(log_alpha / tau)`` is normalised. Smaller is closer to a permutation.
        n_iters: most row+column normalisation rounds.
        tol: stop once every row sums to 1 within ``tol`` (columns are exact after each round).
        backward: ``"implicit"`` (fixed-point gradient, memory independent of ``n_iters``) or
            ``"unrolled"`` (autograd through the iterations; the reference).
        check_every: iterations between two convergence checks (each reads one number back from the
            device); by default 2 on the CPU and 8 elsewhere. The result can only get more accurate.
        warn: emit :class:`SinkhornConvergenceWarning` when the returned matrix's marginal error exceeds
            ``max(tol, WARN_ERROR)`` (iterations ran out: raise ``n_iters``, raise ``tau`` or shrink the
            scores).
        return_info: also return a :class:`SinkhornInfo` (iterations, achieved marginal error).

    Returns:
        A tensor of the same shape whose columns each sum to 1 (to rounding) and whose rows sum to 1
        within ``tol`` when the iterations sufficed (see ``return_info``); ``(P, info)`` with
        ``return_info=True``. It has the input's dtype, except that half precision is computed and
        returned in float32.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import sinkhorn
        >>> scores = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        >>> P, info = sinkhorn(scores, tau=0.5, return_info=True)
        >>> bool(torch.allclose(P.sum(-1), torch.ones(4, 8), atol=1e-4)), info.converged
        (True, True)
        >>> P.pow(2).sum().backward()  # implicit gradient
        >>> scores.grad.shape
        torch.Size([4, 8, 8])
    """
    _check_inputs(log_alpha, tau, n_iters, tol, backward)
    if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be an int >= 1 or None, got {check_every!r}")
    dtype = _compute_dtype(log_alpha.dtype)
    S = log_alpha.to(dtype) / tau
    if S.numel() == 0:  # a batch of no matrices: nothing to normalise, still differentiable
        P = S.exp()
        info = SinkhornInfo(iterations=0, error=0.0, converged=True, absorptions=0)
        return (P, info) if return_info else P
    # One pass over the scaled scores checks both the input and the scaling (a read-back per call).
    if not bool(torch.isfinite(S).all()):
        if not bool(torch.isfinite(log_alpha).all()):
            bad = (~torch.isfinite(log_alpha)).nonzero()[0].tolist()
            raise ValueError(
                f"log_alpha contains NaN or inf (first at index {bad} of shape {tuple(log_alpha.shape)})"
            )
        raise ValueError(
            f"log_alpha / tau overflows (max |log_alpha| {float(log_alpha.abs().max()):.3g}, tau {tau:g}): "
            "raise tau or rescale the scores"
        )
    stats: list[Any] = []
    if backward == "unrolled":
        P, it = _log_sinkhorn_unrolled(S, n_iters, tol, check_every)
        stats = [it, 0, marginal_error(P.detach())]
    else:
        P = _ImplicitSinkhorn.apply(S, n_iters, float(tol), check_every, stats)
    if not (warn or return_info):
        return P
    # One read-back per call: the achieved marginal error of what is returned.
    error = float(stats[2])
    # Rounding alone leaves sums off by about n * eps.
    floor = 4 * P.shape[-1] * torch.finfo(P.dtype).eps
    info = SinkhornInfo(
        iterations=stats[0], error=error, converged=error <= max(tol, floor), absorptions=stats[1]
    )
    if warn and not error <= max(tol, WARN_ERROR):
        warnings.warn(
            f"sinkhorn did not converge: rows or columns are off by {error:.3g} after {info.iterations} "
            f"iterations (n={P.shape[-1]}, tau={tau:g}, max |log_alpha / tau| "
            f"{float(S.detach().abs().max()):.3g}); raise n_iters or tau, or shrink the scores",
            SinkhornConvergenceWarning,
            stacklevel=2,
        )
    return (P, info) if return_info else P
