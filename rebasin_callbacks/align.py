"""The paper's method in one call: ``align(model, reference)`` finds permutations of ``model``'s hidden
units that bring it into ``reference``'s basin.

Three stages:

1. a warm start, by default :func:`~rebasin_callbacks.weight_matching` (fast, often already exact);
2. Sinkhorn refinement: learnable scores per permutation group (:class:`~rebasin_callbacks.ReBasin`),
   relaxed to doubly-stochastic matrices, trained with Adam on any differentiable cost (data-free L2,
   midpoint loss, ...) through the implicit Sinkhorn gradient;
3. after every step the scores are projected to hard permutations (linear assignment) and the hard
   permutations are scored with the cost; the best one seen is returned, so the result is never worse
   than the warm start. The search stops early once nothing improves.

The score scale and the learning rate adapt to each group size (see ``ReBasin(init_scale="auto")``): with
a fixed temperature, 512-wide layers sit at an almost uniform matrix and barely move for tens of steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rebasin_callbacks.costs import RndCost, resolve_cost
from rebasin_callbacks.matching import check_finite, resolve_spec, weight_matching
from rebasin_callbacks.permute import identity_permutations, permute, random_permutations
from rebasin_callbacks.rebasin import PermutedView, ReBasin
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import check_compatible

__all__ = ["align", "AlignResult"]

Init = Literal["weight_matching", "identity", "random"]


@dataclass
class AlignResult:
    """What :func:`align` found.

    Attributes:
        perms: ``{group: LongTensor}``, the best hard permutations (apply with :func:`permute`).
        model: a permuted deep copy of the input model (``pi_P(theta_A)``, close to the reference).
        spec: the permutation spec used.
        history: per step, ``"cost"`` (soft cost the optimizer saw), ``"hard_cost"`` (cost of the
            projected hard permutations), ``"best_cost"`` and ``"time"`` (seconds since the first step
            began, at the end of each step); ``"init_cost"`` holds the warm start's cost.
        steps: optimisation steps run (0 when the warm start could not be improved on).
        seconds: wall-clock time of the whole call.
    """

    perms: dict[str, Tensor]
    model: nn.Module
    spec: PermutationSpec
    history: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    @property
    def cost(self) -> float:
        """The best hard cost found."""
        best = self.history.get("best_cost") or self.history.get("init_cost") or [math.nan]
        return float(best[-1])


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("data yielded no batches")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _device(module: nn.Module) -> torch.device:
    for t in module.state_dict().values():
        return t.device
    return torch.device("cpu")


def _perm_key(perms: Mapping[str, Tensor]) -> tuple:
    return tuple((g, p.numpy().tobytes()) for g, p in sorted(perms.items()))


def align(
    model: nn.Module,
    reference: nn.Module,
    *,
    spec: PermutationSpec | None = None,
    example_inputs: Any = None,
    cost: str | Callable[..., Tensor] = "l2",
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    steps: int = 200,
    lr: float = 0.1,
    init: Init | Mapping[str, Tensor] = "weight_matching",
    tau: float = 1.0,
    early_stopping: int | None = 30,
    progress: bool = True,
    seed: int | None = None,
    n_iters: int = 20,
    noise: float = 0.1,
    init_scale: float | Literal["auto"] = "auto",
) -> AlignResult:
    """Permute ``model``'s hidden units to bring it into ``reference``'s basin (Sinkhorn re-basin).

    Args:
        model: the model to permute (never modified).
        reference: the model to align to (same architecture; never modified).
        spec: the permutation spec; traced from ``example_inputs`` (or the first batch of ``data``) if omitted.
        example_inputs: inputs for :func:`~rebasin_callbacks.trace_spec`.
        cost: ``"l2"`` (data-free, the paper's Eq. 7), ``"cosine"`` (data-free), ``"mid"`` / ``"rnd"``
            (task loss on the line between the models; need ``data`` and ``loss_fn``), or any callable
            ``(view, reference, batch) -> scalar``.
        data: an iterable of ``(inputs, targets)`` batches (a DataLoader), cycled as long as needed; the
            first batch also scores the hard permutations, so results compare on the same data.
        loss_fn: ``(outputs, targets) -> loss`` for ``cost="mid" | "rnd"``.
        steps: most optimisation steps.
        lr: Adam learning rate, relative to each group's score scale.
        init: ``"weight_matching"`` (warm start), ``"identity"`` (the paper's start), ``"random"``, or
            ``{group: LongTensor}``.
        tau: Sinkhorn temperature (on top of the per-size score scale).
        early_stopping: stop after this many steps without a better hard cost or a lower soft cost
            (``None``: run all ``steps``).
        progress: show a progress bar (tqdm, when installed).
        seed: makes the run repeatable (initial jitter, weight-matching order, random init, ``"rnd"``'s
            interpolation points, dropout); the global random state is left untouched.
        n_iters: Sinkhorn iterations per step.
        noise: standard deviation of the jitter added to the initial scores.
        init_scale: margin of the initial permutation in the scores; ``"auto"`` adapts it to each group
            size (``log(n - 1)``, see :func:`~rebasin_callbacks.rebasin.auto_scale`); the paper used 1.

    Returns:
        An :class:`AlignResult`; ``result.model`` computes exactly what ``model`` computes.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import PermutationSpec, align, permute, random_permutations
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> spec = PermutationSpec.from_axes(
        ...     {"0.weight": ("P0", None), "0.bias": ("P0",), "2.weight": (None, "P0"), "2.bias": (None,)},
        ...     mlp.state_dict(),
        ... )
        >>> other = permute(mlp, spec, random_permutations(spec))
        >>> result = align(other, mlp, spec=spec, progress=False, seed=0)
        >>> bool(torch.equal(result.model[0].weight, mlp[0].weight))
        True
    """
    start = time.perf_counter()
    for name, value in (("model", model), ("reference", reference)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if early_stopping is not None and not (isinstance(early_stopping, int) and early_stopping >= 1):
        raise ValueError(f"early_stopping must be an int >= 1 or None, got {early_stopping!r}")
    check_compatible(model, reference)
    check_finite(model, "model")
    check_finite(reference, "reference")
    device = _device(model)
    if _device(reference) != device:
        raise ValueError(
            f"model is on {device} but reference is on {_device(reference)}: move them to one device"
        )

    cost_fn = resolve_cost(cost, loss_fn)
    if getattr(cost_fn, "needs_data", False) and data is None:
        raise ValueError(
            f"cost {cost_fn!r} needs data: pass data=... (an iterable of (inputs, targets) batches)"
        )
    if isinstance(cost, str) and isinstance(cost_fn, RndCost) and seed is not None:
        cost_fn.generator = torch.Generator().manual_seed(int(seed))
    score_fn = getattr(cost_fn, "score", cost_fn)

    batches: Iterator[Any] | None = None
    first: Any = None
    if data is not None:
        # A single (inputs, targets) pair is accepted as a one-batch dataset.
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
            data = [data]
        batches = _cycle(data)
        first = _to_device(next(batches), device)
        if example_inputs is None and spec is None:
            example_inputs = first[0] if isinstance(first, (tuple, list)) else first
    if spec is None and example_inputs is None:
        raise ValueError(
            "align needs a permutation spec: pass spec=..., example_inputs=... (to trace one) or data=..."
        )
    spec = resolve_spec(model, spec, example_inputs)

    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None)
    with fork:
        if seed is not None:
            torch.manual_seed(int(seed))
        perms0 = _initial_permutations(model, reference, spec, init, gen, seed)
        result = _refine(
            model, reference, spec, perms0, cost_fn, score_fn, batches, first,
            steps=steps, lr=lr, tau=tau, n_iters=n_iters, noise=noise, init_scale=init_scale, gen=gen,
            early_stopping=early_stopping, progress=progress,
        )  # fmt: skip
    perms, history, n_steps = result
    aligned = permute(model, spec, perms)
    return AlignResult(
        perms=perms,
        model=aligned,
        spec=spec,
        history=history,
        steps=n_steps,
        seconds=time.perf_counter() - start,
    )


def _initial_permutations(
    model: nn.Module,
    reference: nn.Module,
    spec: PermutationSpec,
    init: Init | Mapping[str, Tensor],
    gen: torch.Generator | None,
    seed: int | None,
) -> dict[str, Tensor]:
    if isinstance(init, Mapping):
        perms = identity_permutations(spec)
        perms.update({g: p.detach().cpu().long() for g, p in init.items()})
        return perms
    if init == "weight_matching":
        return weight_matching(model, reference, spec, seed=seed, _checked=True)
    if init == "identity":
        return identity_permutations(spec)
    if init == "random":
        return random_permutations(spec, gen)
    raise ValueError(
        f"init must be 'weight_matching', 'identity', 'random' or a dict of permutations, got {init!r}"
    )


def _refine(
    model: nn.Module,
    reference: nn.Module,
    spec: PermutationSpec,
    perms0: dict[str, Tensor],
    cost_fn: Callable[..., Tensor],
    score_fn: Callable[..., Tensor],
    batches: Iterator[Any] | None,
    first: Any,
    *,
    steps: int,
    lr: float,
    tau: float,
    n_iters: int,
    noise: float,
    init_scale: float | Literal["auto"],
    gen: torch.Generator | None,
    early_stopping: int | None,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, list[float]], int]:
    rb = ReBasin(
        model, spec, init=perms0, tau=tau, n_iters=n_iters, init_scale=init_scale, noise=noise, generator=gen
    )
    cache: dict[tuple, float] = {}

    def hard_cost(perms: Mapping[str, Tensor]) -> float:
        key = _perm_key(perms)
        if key not in cache:
            with torch.no_grad():
                value = score_fn(PermutedView(model, rb.permuted_state(dict(perms))), reference, first)
            cache[key] = float(value)
            if math.isnan(cache[key]):
                raise FloatingPointError(f"the cost of a hard permutation is NaN (cost {cost_fn!r})")
        return cache[key]

    best_perms = dict(perms0)
    best = hard_cost(best_perms)
    history: dict[str, list[float]] = {
        "cost": [],
        "hard_cost": [],
        "best_cost": [],
        "time": [],
        "init_cost": [best],
    }
    lower = getattr(cost_fn, "lower_bound", None)
    if steps == 0 or (lower is not None and best <= lower + 1e-12):
        return best_perms, history, 0

    # Adam moves every score by about lr per step: scale it with the scores so a group of any size can
    # change its permutation in a similar number of steps.
    opt = torch.optim.Adam([{"params": [p], "lr": lr * rb.scales[b]} for b, p in rb.scores.items()])
    bar = _progress_bar(steps, progress)
    rb.train()
    best_soft = math.inf
    t_start = time.perf_counter()
    stale = 0
    step = 0
    try:
        for step in range(1, steps + 1):
            batch = first if step == 1 or batches is None else _to_device(next(batches), _device(model))
            opt.zero_grad(set_to_none=True)
            value = cost_fn(rb(), reference, batch)
            if not isinstance(value, Tensor) or value.ndim != 0:
                raise TypeError(
                    f"the cost must return a scalar Tensor, got {type(value).__name__} {getattr(value, 'shape', '')}"
                )
            soft = float(value.detach())
            if not math.isfinite(soft):
                raise FloatingPointError(f"the cost is {soft} at step {step} (cost {cost_fn!r})")
            value.backward()
            opt.step()
            perms = rb.project()
            hard = hard_cost(perms)
            stale += 1
            if hard < best:
                best, best_perms, stale = hard, perms, 0
            if soft < best_soft - 1e-4 * abs(best_soft):
                best_soft, stale = soft, 0
            history["cost"].append(soft)
            history["hard_cost"].append(hard)
            history["best_cost"].append(best)
            history["time"].append(time.perf_counter() - t_start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cost=f"{soft:.4g}", best=f"{best:.4g}", refresh=False)
            if lower is not None and best <= lower + 1e-12:
                break
            if early_stopping is not None and stale >= early_stopping:
                break
    finally:
        if bar is not None:
            bar.close()
    return best_perms, history, step


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc="align", leave=False, dynamic_ncols=True)
