"""How :func:`~rebasin_callbacks.merge` finds one permutation per model to a shared frame.

Every model ``i`` gets ``perms[i] = {group: LongTensor}``; ``permute(models[i], spec, perms[i])`` brings it
into the frame. The permutation between two models is the composition through the frame, so any cycle of
them composes to the identity (cycle-consistent by construction). The frame is model 0's: ``perms[0]`` is
the identity.

* :func:`star`: every model weight-matched to model 0 (the naive hub);
* :func:`merge_many`: Git Re-Basin's MergeMany: each model in turn weight-matched to the (weighted) mean
  of the others in the frame, until no model changes;
* :func:`refine_joint`: all permutations optimised together through Sinkhorn (one
  :class:`~rebasin_callbacks.ReBasin` per model), on the distance of every model to the mean (data-free,
  straight-through) or on the task loss of the averaged model on batches (data-driven, soft relaxation,
  BatchNorm on batch statistics as :class:`~rebasin_callbacks.MidCost`). The best hard permutations seen are
  kept, the starting ones included, so the result is never worse than the warm start on its own score.

Example:
    >>> import torch
    >>> from rebasin_callbacks import permute, random_permutations, trace_spec
    >>> from rebasin_callbacks.merge_matching import merge_many
    >>> base = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> spec = trace_spec(base, torch.randn(2, 4))
    >>> models = [permute(base, spec, random_permutations(spec, s)) for s in range(3)]
    >>> perms = merge_many([m.state_dict() for m in models], spec, [1 / 3] * 3)
    >>> all(torch.equal(permute(m, spec, p)[0].weight, models[0][0].weight) for m, p in zip(models, perms))
    True
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import (
    compose_permutations,
    identity_permutations,
    invert_permutations,
    perm_to_matrix,
    permute_state_dict,
)
from rebasin_callbacks.rebasin import ReBasin, apply_soft_permutations
from rebasin_callbacks.sinkhorn import SinkhornConvergenceWarning
from rebasin_callbacks.spec import PermutationSpec

__all__ = [
    "Perms",
    "star",
    "merge_many",
    "refine_joint",
    "to_frame_of",
    "compose",
    "invert",
    "mean_state",
    "distance_to_mean",
]

Perms = dict[str, Tensor]
State = Mapping[str, Tensor]


# --------------------------------------------------------------------------------------------- helpers
def compose(spec: PermutationSpec, first: Mapping[str, Tensor], then: Mapping[str, Tensor]) -> Perms:
    """The permutations that do ``first`` and then ``then`` (``permute`` twice equals ``permute`` once with
    these), exact with block groups (:func:`~rebasin_callbacks.permute.compose_permutations`), on
    ``first``'s device."""
    device = next(iter(first.values())).device if first else torch.device("cpu")
    return {g: q.to(device) for g, q in compose_permutations(spec, first, then).items()}


def invert(spec: PermutationSpec, perms: Mapping[str, Tensor]) -> Perms:
    """The permutations that undo ``perms`` (exact with block groups), on their device."""
    device = next(iter(perms.values())).device if perms else torch.device("cpu")
    return {g: q.to(device) for g, q in invert_permutations(spec, perms).items()}


def to_frame_of(spec: PermutationSpec, perms: Sequence[Mapping[str, Tensor]], i: int = 0) -> list[Perms]:
    """The same alignment expressed in model ``i``'s frame (its permutations become the identity)."""
    back = invert(spec, perms[i])
    return [compose(spec, p, back) for p in perms]


def mean_state(states: Sequence[State], weights: Sequence[float]) -> dict[str, Tensor]:
    """``sum_i w_i state_i`` for floating-point entries (in the first state's dtype); other entries from
    the first state."""
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first
            continue
        work = first.float() if first.dtype in (torch.float16, torch.bfloat16) else first
        total = sum(w * s[key].to(work.dtype) for w, s in zip(weights, states))
        out[key] = torch.as_tensor(total).to(first.dtype)
    return out


def _param_keys(spec_keys: Iterable[str], state: State) -> list[str]:
    return [k for k in spec_keys if k in state and state[k].is_floating_point()]


def distance_to_mean(
    states: Sequence[State], weights: Sequence[float], keys: Sequence[str] | None = None
) -> float:
    """``sum_i w_i ||state_i - mean||^2 / count`` over ``keys`` (default: every floating-point entry): the
    data-free objective every method lowers (for two models with equal weights, a quarter of their mean
    squared distance, :class:`~rebasin_callbacks.L2Cost`'s value)."""
    keys = list(keys) if keys is not None else [k for k, v in states[0].items() if v.is_floating_point()]
    total, count = 0.0, 0
    for key in keys:
        stack = torch.stack([s[key].detach().double() for s in states])
        w = torch.tensor(list(weights), dtype=torch.float64, device=stack.device).view(
            -1, *[1] * (stack.ndim - 1)
        )
        mean = (w * stack).sum(0)
        total += float((w * (stack - mean).pow(2)).sum())
        count += stack[0].numel()
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------- baselines
def star(states: Sequence[State], spec: PermutationSpec, *, seed: int | None = 0) -> list[Perms]:
    """Every model weight-matched to model 0 (the hub), independently."""
    out = [identity_permutations(spec)]
    for s in states[1:]:
        out.append(weight_matching(dict(s), dict(states[0]), spec, seed=seed))
    return out


def merge_many(
    states: Sequence[State],
    spec: PermutationSpec,
    weights: Sequence[float],
    *,
    init: Sequence[Mapping[str, Tensor]] | None = None,
    max_rounds: int = 20,
    seed: int | None = 0,
    history: list[float] | None = None,
) -> list[Perms]:
    """Git Re-Basin's MergeMany: in a random order each round, model ``i`` is weight-matched to the
    weighted mean of the other models (in the frame); a new permutation is kept when it lowers the
    model's distance to that mean. Stops after a round in which no model changed. Returned in model 0's
    frame.

    ``history`` (when given) gets the distance to the mean (:func:`distance_to_mean`) after every round."""
    n = len(states)
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    perms = [dict(p) for p in init] if init is not None else [identity_permutations(spec) for _ in states]
    keys = [k for k in spec.axes_to_perm if k in states[0] and states[0][k].is_floating_point()]
    aligned = [permute_state_dict(s, spec, p) for s, p in zip(states, perms)]
    for _ in range(max_rounds):
        changed = False
        for i in torch.randperm(n, generator=gen).tolist():
            rest = [j for j in range(n) if j != i]
            total = sum(weights[j] for j in rest)
            target = mean_state([aligned[j] for j in rest], [weights[j] / total for j in rest])
            # from the current permutation when warm-started (a polish), else weight matching's greedy start
            start = perms[i] if init is not None else None
            new = weight_matching(dict(states[i]), target, spec, init=start, seed=seed)
            if all(torch.equal(new[g], perms[i][g]) for g in new):
                continue
            candidate = permute_state_dict(states[i], spec, new)
            if _sq_dist(candidate, target, keys) < _sq_dist(aligned[i], target, keys) - 1e-12:
                perms[i], aligned[i], changed = new, candidate, True
        if history is not None:
            history.append(distance_to_mean(aligned, weights, keys))
        if not changed:
            break
    return to_frame_of(spec, perms)


def _sq_dist(a: State, b: State, keys: Sequence[str]) -> float:
    return float(sum((a[k].detach().double() - b[k].detach().double()).pow(2).sum() for k in keys))


# --------------------------------------------------------------------------------------------- joint Sinkhorn
class _Cycle:
    """Batches of an iterable, cycled as long as needed (a one-shot iterator is replayed)."""

    def __init__(self, data: Iterable[Any]):
        self.data, self.seen = data, []  # type: ignore[var-annotated]
        self.one_shot = iter(data) is data
        self._it: Iterator[Any] = iter(data)
        self._replay = -1

    def __next__(self) -> Any:
        if self._replay >= 0:
            self._replay += 1
            return self.seen[self._replay % len(self.seen)]
        try:
            batch = next(self._it)
        except StopIteration:
            if not self.seen:
                raise ValueError("data yielded no batches") from None
            if self.one_shot:
                self._replay = 0
                return self.seen[0]
            self._it = iter(self.data)
            batch = next(self._it)
        if self.one_shot or len(self.seen) < 8:
            self.seen.append(batch)
        return batch


def merged_loss(
    model: nn.Module, state: Mapping[str, Tensor], batch: Any, loss_fn: Callable[[Any, Any], Tensor]
) -> Tensor:
    """Task loss of ``model``'s structure evaluated with ``state`` on ``(inputs, targets)``; BatchNorm layers
    normalise with the batch's statistics (the averaged model's running statistics mean nothing) and
    ``model``'s buffers are never updated (as :class:`~rebasin_callbacks.MidCost`)."""
    inputs, targets = batch[0], batch[1]
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if norms or model.training:
        buffers = {k for k, _ in model.named_buffers()}
        state = {k: (v.detach().clone() if k in buffers else v) for k, v in state.items()}
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.training = True
        out = functional_call(model, dict(state), inputs if isinstance(inputs, tuple) else (inputs,),
                              tie_weights=True, strict=False)  # fmt: skip
    finally:
        for m, mode in zip(norms, modes):
            m.training = mode
    return loss_fn(out, targets)


def refine_joint(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    weights: Sequence[float],
    init: Sequence[Mapping[str, Tensor]],
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    score_batches: int = 2,
    steps: int = 100,
    lr: float | None = None,
    tau: float | None = None,
    patience: int | None = None,
    budget: float | None = None,
    polish: bool = True,
    seed: int | None = 0,
    progress: Callable[[int, float, float], None] | None = None,
) -> tuple[list[Perms], dict[str, list[float]]]:
    """All models' permutations to the frame optimised together through Sinkhorn; model 0 stays fixed (the
    frame), so for two models this is :func:`~rebasin_callbacks.align`'s problem.

    Without ``data``: the distance of every model to the weighted mean (:func:`distance_to_mean` over the
    parameters), straight-through (the forward pass at the projected hard permutations, the Sinkhorn
    gradient backward), each new hard permutation polished by one MergeMany round. With ``data`` and
    ``loss_fn``: the loss of the averaged model on a new batch each step through the soft relaxation; the
    hard permutations are scored on the first ``score_batches`` batches.

    Returns the best permutations seen (``init`` included) and the history (``"cost"``, ``"hard_cost"``,
    ``"best_cost"``, ``"time"``; ``"init_cost"``). ``budget`` (seconds) stops the search once it has run that
    long in all (a hard cap: the refinement then costs at most that, plus one step).
    """
    data_driven = data is not None
    if data_driven and loss_fn is None:
        raise ValueError("refine_joint: data needs loss_fn=(outputs, targets) -> loss")
    n = len(models)
    tau = (0.5 if data_driven else 1.0) if tau is None else tau
    lr = (0.1 if data_driven else 0.3) if lr is None else lr
    patience = (60 if data_driven else 30) if patience is None else patience
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    base = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    params = {k for k, _ in models[0].named_parameters()}
    keys = [k for k in base[0] if k in params and base[0][k].is_floating_point()]
    structure = models[0]

    scoring: list[Any] = []
    batches: _Cycle | None = None
    if data_driven:
        assert data is not None
        batches = _Cycle(data)
        scoring = [next(batches) for _ in range(max(1, score_batches))]

    def hard_states(perms: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        return [permute_state_dict(b, spec, p) for b, p in zip(base, perms)]

    def score(perms: Sequence[Mapping[str, Tensor]]) -> float:
        states = hard_states(perms)
        if not data_driven:
            return distance_to_mean(states, weights, keys)
        assert loss_fn is not None
        merged = mean_state(states, weights)
        with torch.no_grad():
            values = [float(merged_loss(structure, merged, b, loss_fn)) for b in scoring]
        return sum(values) / len(values)

    best_perms = [dict(p) for p in init]
    best = score(best_perms)
    history: dict[str, list[float]] = {
        "cost": [],
        "hard_cost": [],
        "best_cost": [],
        "time": [],
        "init_cost": [best],
    }
    if steps <= 0 or n < 2:
        return best_perms, history
    init_scale: Any = 1.0 if not data_driven else "auto"
    rbs = [
        ReBasin(m, spec, init=p, tau=tau, init_scale=init_scale, init_noise=0.1, seed=gen)
        for m, p in zip(models[1:], best_perms[1:])
    ]
    opt = torch.optim.Adam(
        [{"params": [p], "lr": lr * rb.scales[b]} for rb in rbs for b, p in rb.scores.items()]
    )
    for rb in rbs:
        rb.train()
    w = [float(x) for x in weights]
    t0 = time.perf_counter()
    stale = 0
    seen: set[tuple] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            soft = [rb.soft_permutations() for rb in rbs]
            projected = [identity_permutations(spec)] + [rb.project() for rb in rbs]
            if data_driven:
                mats = soft
            else:  # straight-through: the hard permutation forward, the Sinkhorn gradient backward
                mats = [
                    {g: perm_to_matrix(p[g].to(P.device), P.dtype) + (P - P.detach()) for g, P in s.items()}
                    for s, p in zip(soft, projected[1:])
                ]
            states = [base[0]] + [apply_soft_permutations(b, spec, m) for b, m in zip(base[1:], mats)]
            if data_driven:
                assert batches is not None and loss_fn is not None
                merged = {k: sum(wi * s[k] for wi, s in zip(w, states)) if base[0][k].is_floating_point()
                          else base[0][k] for k in base[0]}  # fmt: skip
                value = merged_loss(structure, merged, next(batches), loss_fn)
            else:
                value = _diff_distance(states, w, keys)
            if not torch.isfinite(value):
                raise FloatingPointError(f"merge: the cost is {float(value)} at step {step}")
            value.backward()
            opt.step()
            perms = projected
            key = _key(perms)
            hard = score(perms) if (data_driven or key not in seen) else history["hard_cost"][-1]
            if polish and not data_driven and key not in seen:
                seen.add(key)
                better = merge_many([b for b in base], spec, w, init=perms, max_rounds=1, seed=seed)
                h = score(better)
                if h < hard:
                    perms, hard = better, h
            stale += 1
            if hard < best:
                if hard < best - 1e-3 * abs(best):
                    stale = 0
                best, best_perms = hard, [dict(p) for p in perms]
            now = time.perf_counter()
            history["cost"].append(float(value.detach()))
            history["hard_cost"].append(hard)
            history["best_cost"].append(best)
            history["time"].append(now - t0)
            if progress is not None:
                progress(step, float(value.detach()), best)
            if stale >= patience or (budget is not None and now - t0 > budget):
                break
    return best_perms, history


def _diff_distance(states: Sequence[Mapping[str, Tensor]], w: Sequence[float], keys: Sequence[str]) -> Tensor:
    total: Tensor | None = None
    count = 0
    for key in keys:
        vals = [s[key] for s in states]
        mean = sum(wi * v for wi, v in zip(w, vals))
        term = sum(wi * (v - mean).pow(2).sum() for wi, v in zip(w, vals))
        total = term if total is None else total + term  # type: ignore[assignment]
        count += vals[0].numel()
    assert total is not None
    return total / count


def _key(perms: Sequence[Mapping[str, Tensor]]) -> tuple:
    return tuple((i, g, p.numpy().tobytes()) for i, ps in enumerate(perms) for g, p in sorted(ps.items()))


def cycle_error(pairwise: Callable[[int, int], Mapping[str, Tensor]], n: int, spec: PermutationSpec) -> float:
    """The fraction of units that do not come back to themselves around the triangles ``i -> j -> k -> i``
    of the pairwise permutations ``pairwise(i, j)`` (maps model ``i`` into model ``j``'s frame): 0 for
    permutations composed through one frame, typically above 0 for independent pairwise matchings."""
    wrong, total = 0, 0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if len({i, j, k}) < 3:
                    continue
                pij, pjk, pki = pairwise(i, j), pairwise(j, k), pairwise(k, i)
                loop = compose(spec, compose(spec, pij, pjk), pki)
                for p in loop.values():
                    wrong += int((p != torch.arange(p.numel())).sum())
                    total += p.numel()
    return wrong / total if total else math.nan
