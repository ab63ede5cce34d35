"""Re-basin costs: what the learnable permutations minimise.

A cost is any callable ``cost(view, reference, batch) -> scalar Tensor`` where ``view`` is the permuted
model (a :class:`~rebasin_callbacks.rebasin.PermutedView`: soft permutations while learning, hard ones when
the result is scored), ``reference`` is the model to align to and ``batch`` is ``(inputs, targets)`` or
``None`` for data-free costs. The classes here are the paper's costs:

* :class:`L2Cost`: squared L2 distance between the permuted model and the reference (the paper's Eq. 7,
  data-free);
* :class:`MidCost`: task loss of the midpoint ``(pi_P(theta_A) + theta_B) / 2`` on a batch;
* :class:`RndCost`: task loss at a uniformly random point ``(1 - l) pi_P(theta_A) + l theta_B`` of the line;
* :class:`CosineCost`: one minus the cosine similarity, averaged over parameter tensors (data-free).

Two optional attributes tell :func:`~rebasin_callbacks.align` more about a cost: ``needs_data`` (it must
get batches) and ``lower_bound`` (a value no permutation can beat: reaching it ends the search early).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

# re-exported here too: the costs interpolate through it (differentiably)
from rebasin_callbacks.utils import as_generator, interpolate_state

__all__ = ["Cost", "L2Cost", "MidCost", "RndCost", "CosineCost", "interpolate_state", "resolve_cost"]


class Cost(Protocol):
    """The signature every cost follows (user callables included)."""

    def __call__(self, view: Any, reference: nn.Module, batch: Any) -> Tensor: ...


def _reference_state(reference: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in reference.state_dict(keep_vars=True).items()}


def _check_key(key: str, value: Tensor, ref: Mapping[str, Tensor]) -> Tensor:
    other = ref.get(key)
    if other is None:
        raise KeyError(
            f"the reference has no entry {key!r} (the permuted model has shape {tuple(value.shape)})"
        )
    if other.shape != value.shape:
        raise ValueError(
            f"{key!r}: the permuted model has shape {tuple(value.shape)} but the reference has {tuple(other.shape)}"
        )
    return other


class L2Cost:
    """Mean squared difference between the permuted model's parameters and the reference's (Eq. 7).

    The sum of squared differences over every floating-point parameter, divided by the number of
    elements, so the value does not grow with the model (Adam does not care about the scale; people
    reading the history do). Buffers (BatchNorm statistics) are permuted with the model but not scored.

    Example:
        >>> import torch
        >>> from rebasin_callbacks.costs import L2Cost
        >>> from rebasin_callbacks.rebasin import PermutedView
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> float(L2Cost()(PermutedView(a, a.state_dict()), a, None))
        0.0
    """

    needs_data = False
    lower_bound = 0.0

    def __call__(self, view: Any, reference: nn.Module, batch: Any = None) -> Tensor:
        ref = _reference_state(reference)
        total: Tensor | None = None
        count = 0
        for key, value in view.parameters().items():
            if not value.is_floating_point():
                continue
            diff = (value - _check_key(key, value, ref)).pow(2).sum()
            total = diff if total is None else total + diff
            count += value.numel()
        if total is None:
            raise ValueError(f"{type(reference).__name__} has no floating-point parameters to compare")
        return total / count

    def __repr__(self) -> str:
        return "L2Cost()"


class CosineCost:
    """One minus the cosine similarity of each parameter tensor to the reference's, averaged over tensors.

    Scale-invariant per tensor, so a small layer weighs as much as a large one (unlike :class:`L2Cost`).

    Example:
        >>> import torch
        >>> from rebasin_callbacks.costs import CosineCost
        >>> from rebasin_callbacks.rebasin import PermutedView
        >>> a = torch.nn.Linear(3, 2)
        >>> round(float(CosineCost()(PermutedView(a, a.state_dict()), a, None)), 5)
        0.0
    """

    needs_data = False
    lower_bound = 0.0

    def __init__(self, eps: float = 1e-12):
        self.eps = eps

    def __call__(self, view: Any, reference: nn.Module, batch: Any = None) -> Tensor:
        ref = _reference_state(reference)
        terms = []
        for key, value in view.parameters().items():
            if not value.is_floating_point():
                continue
            other = _check_key(key, value, ref).to(value.dtype)
            num = (value * other).sum()
            den = (value.pow(2).sum() * other.pow(2).sum()).clamp_min(self.eps).sqrt()
            terms.append(1 - num / den)
        if not terms:
            raise ValueError(f"{type(reference).__name__} has no floating-point parameters to compare")
        return torch.stack(terms).mean()

    def __repr__(self) -> str:
        return "CosineCost()"


class _LineCost:
    """Task loss of a point on the line between the permuted model and the reference."""

    needs_data = True
    lower_bound: float | None = None

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor], *, batch_stats: bool = True):
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}"
            )
        self.loss_fn = loss_fn
        self.batch_stats = batch_stats

    def _lambda(self, device: torch.device) -> float | Tensor:
        raise NotImplementedError

    def __call__(self, view: Any, reference: nn.Module, batch: Any) -> Tensor:
        if batch is None:
            raise ValueError(
                f"{type(self).__name__} needs data: pass data=... (an iterable of (inputs, targets))"
            )
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(
                f"{type(self).__name__} expects batches (inputs, targets), got {type(batch).__name__}"
            )
        inputs, targets = batch[0], batch[1]
        ref = _reference_state(reference)
        lam = self._lambda(next(iter(ref.values())).device)
        state = interpolate_state(view.state, ref, lam, differentiable=True)
        norms = [m for m in reference.modules() if isinstance(m, _BatchNorm)] if self.batch_stats else []
        if reference.training or norms:
            # BatchNorm in train mode normalises with the batch's statistics and updates its running
            # statistics in place: give it detached copies, so neither autograd nor the user's buffers see it.
            buffers = {k for k, _ in reference.named_buffers()}
            state = {k: (v.detach().clone() if k in buffers else v) for k, v in state.items()}
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        # The interpolated model's running statistics are meaningless (the literature resets them): its
        # BatchNorm layers normalise with the batch statistics instead, the other layers keep their mode.
        modes = [m.training for m in norms]
        try:
            for m in norms:
                m.training = True
            outputs = functional_call(reference, state, args, tie_weights=True, strict=False)
        finally:
            for m, mode in zip(norms, modes):
                m.training = mode
        return self.loss_fn(outputs, targets)


class MidCost(_LineCost):
    """Task loss of the midpoint ``(pi_P(theta_A) + theta_B) / 2`` on a batch (the paper's C_Mid).

    The midpoint is evaluated with the reference's structure (``functional_call``) in the reference's
    current mode, except that BatchNorm layers normalise with the batch's statistics (``batch_stats=True``,
    the default: an interpolated model's running statistics do not describe its activations, which is why
    the literature resets them; this also keeps BatchNorm networks in eval mode differentiable). The
    reference's buffers are never updated. With ``batch_stats=False`` BatchNorm follows the reference's
    mode and uses the interpolated running statistics.

    Example:
        >>> import torch
        >>> from rebasin_callbacks.costs import MidCost
        >>> from rebasin_callbacks.rebasin import PermutedView
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> cost = MidCost(torch.nn.functional.cross_entropy)
        >>> cost(PermutedView(a, a.state_dict()), b, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))).ndim
        0
    """

    def _lambda(self, device: torch.device) -> float:
        return 0.5

    def __repr__(self) -> str:
        return f"MidCost({getattr(self.loss_fn, '__name__', type(self.loss_fn).__name__)})"


class RndCost(_LineCost):
    """Task loss at a uniformly random point of the line between the permuted model and the reference
    (the paper's C_Rnd): a new ``lam ~ U(0, 1)`` at every call.

    Args:
        loss_fn: ``(outputs, targets) -> scalar loss``.
        seed: an int or a CPU ``torch.Generator`` for ``lam`` (or let :func:`align` seed it) to repeat runs.

    Example:
        >>> import torch
        >>> from rebasin_callbacks.costs import RndCost
        >>> cost = RndCost(torch.nn.functional.mse_loss, seed=0)
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Tensor],
        seed: int | torch.Generator | None = None,
        *,
        batch_stats: bool = True,
    ):
        super().__init__(loss_fn, batch_stats=batch_stats)
        self.generator = as_generator(seed)
        self._fixed: float | None = None

    def _lambda(self, device: torch.device) -> float:
        if self._fixed is not None:
            return self._fixed
        return float(torch.rand((), generator=self.generator))

    def score(self, view: Any, reference: nn.Module, batch: Any) -> Tensor:
        """A deterministic version for comparing permutations: the mean loss at ``lam = 1/4, 1/2, 3/4``."""
        values = []
        for lam in (0.25, 0.5, 0.75):
            self._fixed = lam
            try:
                values.append(self(view, reference, batch))
            finally:
                self._fixed = None
        return torch.stack(values).mean()

    def __repr__(self) -> str:
        return f"RndCost({getattr(self.loss_fn, '__name__', type(self.loss_fn).__name__)})"


_NAMES = {"l2": L2Cost, "mid": MidCost, "rnd": RndCost, "cosine": CosineCost}


def resolve_cost(
    cost: str | Callable[..., Tensor], loss_fn: Callable[[Any, Any], Tensor] | None = None
) -> Any:
    """Turn ``"l2" | "mid" | "rnd" | "cosine"`` or a callable into a cost object."""
    if callable(cost):
        return cost
    if not isinstance(cost, str) or cost.lower() not in _NAMES:
        raise ValueError(
            f"cost must be one of {sorted(_NAMES)} or a callable (view, reference, batch), got {cost!r}"
        )
    cls = _NAMES[cost.lower()]
    if cls in (MidCost, RndCost):
        if loss_fn is None:
            raise ValueError(
                f"cost={cost!r} is a task loss on the interpolated model: pass loss_fn=(outputs, targets)"
            )
        return cls(loss_fn)
    return cls()
