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

A cost tells :func:`~rebasin_callbacks.align` how it wants to be optimised through :class:`CostHints`
(its ``hints`` attribute: whether it needs data, its preferred temperature, method and patience, a value no
permutation can beat), and may offer a ``score`` method (a deterministic version used to compare hard
permutations) and a ``closed_form_gradient`` (:class:`DescribedCost`). A plain callable works too: its
hints are read from optional ``needs_data`` / ``lower_bound`` attributes (:func:`cost_hints`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from rebasin_callbacks.matching import L2Gradient, MatchingProblem
from rebasin_callbacks.seeds import as_generator
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.states import interpolate_state_dict

__all__ = [
    "Cost",
    "CostHints",
    "DescribedCost",
    "cost_hints",
    "L2Cost",
    "MidCost",
    "RndCost",
    "CosineCost",
    "resolve_cost",
]


class Cost(Protocol):
    """The signature every cost follows (user callables included)."""

    def __call__(self, view: Any, reference: nn.Module, batch: Any) -> Tensor: ...


@dataclass(frozen=True)
class CostHints:
    """What a cost tells :func:`~rebasin_callbacks.align` about itself (each ``"auto"`` of align reads one).

    Attributes:
        needs_data: it must get ``(inputs, targets)`` batches.
        tau: its preferred Sinkhorn temperature (``align(tau="auto")``).
        method: its preferred relaxation method; ``None``: ``"soft"`` with data, ``"ste"`` without.
        patience: steps without a better hard permutation before the search stops; ``None``: 100 with
            data (scored on one batch, progress shows up slowly), 30 without.
        lower_bound: a value no permutation can beat (reaching it ends the search).
        polish: weight matching's coordinate descent maximises this cost's inner products, so polishing
            each new permutation with it helps (``align(polish="auto")``).
        probe: call the cost once before any work, to fail early on a wrong return value (off for the
            built-in data-free costs, which cannot return one).

    Example:
        >>> from rebasin_callbacks.costs import MidCost, cost_hints
        >>> cost_hints(MidCost(lambda out, y: out.mean())).tau
        0.5
    """

    needs_data: bool = False
    tau: float = 1.0
    method: str | None = None
    patience: int | None = None
    lower_bound: float | None = None
    polish: bool = False
    probe: bool = True

    @property
    def preferred_method(self) -> str:
        """``method``, else ``"soft"`` for a data-driven cost (its soft midpoint loss is the smoother signal
        on a changing batch) and ``"ste"`` for a data-free one."""
        return self.method or ("soft" if self.needs_data else "ste")

    @property
    def preferred_patience(self) -> int:
        """``patience``, else 100 for a data-driven cost and 30 for a data-free one."""
        if self.patience is not None:
            return self.patience
        return PATIENCE_DATA if self.needs_data else PATIENCE


#: steps without a better hard permutation before the search stops (``early_stopping="auto"``): after 30
#: quiet steps a trained ResNet pair's midpoint barrier was 6% below weight matching's, after 100 34%
#: (BENCHMARKS.md); a data-free cost is scored exactly, so 30 quiet steps mean it is stuck
PATIENCE, PATIENCE_DATA = 30, 100


@runtime_checkable
class DescribedCost(Protocol):
    """A cost that describes itself: ``hints`` is read by :func:`cost_hints`. Optional methods that
    :func:`~rebasin_callbacks.align` uses when present:

    * ``score(view, reference, batch) -> Tensor``: a deterministic version for comparing permutations;
    * ``closed_form_gradient(model, reference, spec, problem) -> Callable[[perms], {group: Tensor}] | None``:
      the gradient of the cost with respect to each permutation matrix at a hard permutation, so the
      straight-through step applies no matrix to the weights (:class:`L2Cost` offers it).
    """

    hints: CostHints

    def __call__(self, view: Any, reference: nn.Module, batch: Any) -> Tensor: ...


def cost_hints(cost: Any) -> CostHints:
    """The :class:`CostHints` of any cost: its ``hints``, else read from optional ``needs_data`` and
    ``lower_bound`` attributes of a plain callable.

    Example:
        >>> cost_hints(lambda view, ref, batch: 0).needs_data
        False
    """
    hints = getattr(cost, "hints", None)
    if isinstance(hints, CostHints):
        return hints
    if hints is not None:
        raise TypeError(f"the cost's hints must be a CostHints, got {type(hints).__name__}")
    return CostHints(
        needs_data=bool(getattr(cost, "needs_data", False)), lower_bound=getattr(cost, "lower_bound", None)
    )


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

    # weight matching's coordinate descent maximises exactly this cost's inner products
    hints = CostHints(lower_bound=0.0, polish=True, probe=False)

    def closed_form_gradient(
        self, model: nn.Module, reference: nn.Module, spec: PermutationSpec, problem: MatchingProblem | None
    ) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None:
        """The gradient at a hard permutation in closed form (:class:`~rebasin_callbacks.matching.L2Gradient`:
        a constant Gram term minus weight matching's similarity); ``None`` for a subclass that changes
        what the cost computes."""
        if type(self).__call__ is not L2Cost.__call__:
            return None
        return L2Gradient(model, reference, spec, problem=problem)

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

    hints = CostHints(lower_bound=0.0, probe=False)

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

    hints = CostHints(needs_data=True)

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
        state = interpolate_state_dict(view.state, ref, lam, differentiable=True)
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

    # its soft midpoint at tau 1 rewards averaging units rather than choosing a better permutation (loss
    # barrier 26-61% below weight matching's on the 9 trained pairs of BENCHMARKS.md at 0.5, 8-74% at 1)
    hints = CostHints(needs_data=True, tau=0.5)

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
    cost: str | Callable[..., Tensor],
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    seed: int | None = None,
) -> Any:
    """Turn ``"l2" | "mid" | "rnd" | "cosine"`` or a callable into a cost object; ``seed`` seeds a named
    cost that draws random numbers (``"rnd"``); a given callable is returned as it is."""
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
        return RndCost(loss_fn, seed=seed) if cls is RndCost else cls(loss_fn)
    return cls()
