"""Many models into one basin: ``merge(models)`` aligns N >= 2 models of one architecture to a shared frame
and averages them.

Each model gets one permutation per group to the frame (model 0's), so the permutation between any two
models is the composition through the frame and every cycle composes to the identity. Methods (see
:mod:`rebasin_callbacks.merge_matching`):

* ``"naive"``: no permutation, the plain average;
* ``"star"``: every model weight-matched to model 0;
* ``"merge_many"``: Git Re-Basin's MergeMany (each model weight-matched to the mean of the others, in turn);
* ``"data_free"`` (default): MergeMany, then all permutations optimised together through Sinkhorn on the
  distance of every model to the mean (never worse than MergeMany on that distance);
* ``"data"``: MergeMany, then all permutations optimised together on the loss of the averaged model on
  batches of ``data`` (BatchNorm on batch statistics); the best hard permutations on the scoring batches
  are kept, MergeMany's included.

For two models with equal weights ``"data_free"`` and ``"data"`` are :func:`~rebasin_callbacks.align` with
``cost="l2"`` / ``cost="mid"`` (the same objective), and give its permutations.

The merged model is the weighted average of the aligned models; ``reset_bn=True`` recomputes its
BatchNorm statistics and ``repair=True`` gives every unit the weighted average of the aligned models'
statistics (REPAIR for N models), both on ``bn_data`` (default ``data``).

Example:
    >>> import torch
    >>> from rebasin_callbacks import merge, permute, random_permutations, trace_spec
    >>> base = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> spec = trace_spec(base, torch.randn(2, 4))
    >>> models = [permute(base, spec, random_permutations(spec, s)) for s in range(3)]
    >>> result = merge(models, spec=spec, progress=False)
    >>> bool(torch.allclose(result.merged[0].weight, models[0][0].weight)), result.cycle_error()
    (True, 0.0)
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rebasin_callbacks.merge_matching import (
    Perms,
    compose,
    cycle_error,
    distance_to_mean,
    invert,
    mean_state,
    merge_many,
    refine_joint,
    star,
)
from rebasin_callbacks.permute import identity_permutations, permute
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.utils import (
    check_compatible,
    check_finite,
    follow,
    module_device,
    module_dtype,
    split_batch,
    take_batches,
    thread_limit,
    to_device,
)

__all__ = [
    "merge",
    "MergeResult",
    "MergeEvaluation",
    "evaluate_merge",
    "average_models",
    "repair_many",
    "METHODS",
]

Method = Literal["naive", "star", "merge_many", "data_free", "data"]
METHODS: tuple[str, ...] = ("naive", "star", "merge_many", "data_free", "data")


@dataclass
class MergeEvaluation:
    """Loss / accuracy of every model, of the merged model and of the ensemble (averaged logits).

    Attributes:
        models: per input model, ``{"loss": ..., "accuracy": ...}``.
        merged: the merged model's metrics.
        ensemble: the ensemble's (weighted mean of the models' logits: the usual ceiling of a merge).
        barrier: the merged model's loss minus the (weighted) mean of the models' losses.
        accuracy_drop: the mean of the models' accuracies minus the merged model's (NaN without accuracy).
    """

    models: list[dict[str, float]]
    merged: dict[str, float]
    ensemble: dict[str, float]
    barrier: float
    accuracy_drop: float = math.nan

    def summary(self) -> str:
        """One line for logs."""
        acc = self.merged.get("accuracy")
        ens = self.ensemble.get("accuracy")
        return f"merged loss {self.merged['loss']:.4f} (barrier {self.barrier:+.4f})" + (
            f", accuracy {acc:.4f} (ensemble {ens:.4f})" if acc is not None and ens is not None else ""
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON, loggers)."""
        return {
            "models": [dict(m) for m in self.models],
            "merged": dict(self.merged),
            "ensemble": dict(self.ensemble),
            "barrier": self.barrier,
            "accuracy_drop": self.accuracy_drop,
        }


@dataclass
class MergeResult:
    """What :func:`merge` found.

    Attributes:
        perms: per model, ``{group: LongTensor}`` into the frame (model 0's: ``perms[0]`` is the identity).
        models: the aligned models (permuted deep copies; each computes what its input computes).
        merged: the weighted average of ``models`` (BatchNorm statistics reset / repaired when asked).
        spec: the permutation spec used.
        weights: the merge weights (summing to 1).
        method: the method used.
        history: ``"distance"``: the models' distance to their mean (:func:`distance_to_mean`) before and
            after; per step of a refinement ``"cost"``, ``"hard_cost"``, ``"best_cost"``, ``"time"``;
            ``"merge_many"``: the distance after each MergeMany round.
        seconds: wall-clock time of the alignment (not of BatchNorm reset / REPAIR).
    """

    perms: list[dict[str, Tensor]]
    models: list[nn.Module]
    merged: nn.Module
    spec: PermutationSpec
    weights: list[float]
    method: str
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def pairwise(self, i: int, j: int) -> dict[str, Tensor]:
        """The permutations that bring model ``i`` into model ``j``'s frame (through the shared frame)."""
        return compose(self.spec, self.perms[i], invert(self.spec, self.perms[j]))

    def cycle_error(self) -> float:
        """Fraction of units that do not return to themselves around the triangles of :meth:`pairwise`
        (0 by construction; NaN for fewer than 3 models)."""
        return cycle_error(self.pairwise, len(self.perms), self.spec)

    def evaluate(
        self, data: Iterable[Any], loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, *,
        max_batches: int | None = None,
    ) -> MergeEvaluation:  # fmt: skip
        """:func:`evaluate_merge` of the aligned models, the merged model and their ensemble."""
        return evaluate_merge(self.models, self.merged, data, loss_fn, weights=self.weights,
                              max_batches=max_batches)  # fmt: skip


# --------------------------------------------------------------------------------------------- checks
def _check_models(models: Any) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError(f"merge: models must be a list of nn.Module, got {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"merge needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"merge: models[{i}] must be an nn.Module, got {type(m).__name__}")
        if type(m) is not type(models[0]):
            raise SpecMismatchError(
                f"merge: different architectures: models[0] is a {type(models[0]).__name__} but models[{i}] "
                f"is a {type(m).__name__}"
            )
        if i:
            check_compatible(models[0], m, names=("models[0]", f"models[{i}]"))
        check_finite(m, f"models[{i}]")
    return models


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"merge: weights has {len(w)} entries for {n} models")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"merge: weights must be finite, >= 0 and not all 0, got {w}")
    total = sum(w)
    return [x / total for x in w]


def _resolve_spec(models: Sequence[nn.Module], spec: PermutationSpec | None, example_inputs: Any,
                  data: Iterable[Any] | None) -> PermutationSpec:  # fmt: skip
    from rebasin_callbacks.spec_source import resolve_spec

    if spec is None and example_inputs is None and data is not None:
        first = next(iter(data))
        x, _ = split_batch(first)
        example_inputs = to_device(x, module_device(models[0]))
    spec = resolve_spec(models[0], spec, example_inputs)
    for i, m in enumerate(models[1:], 1):
        try:
            spec.validate(m.state_dict(), name=f"models[{i}]")
        except SpecMismatchError as err:
            raise SpecMismatchError(f"merge: the spec does not fit models[{i}]: {err}") from None
    return spec


# --------------------------------------------------------------------------------------------- the merge
def average_models(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> nn.Module:
    """A deep copy of ``models[0]`` holding the weighted average of every floating-point entry (integer
    buffers from ``models[0]``). The models must share keys and shapes.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> bool(torch.allclose(average_models([a, b]).weight, (a.weight + b.weight) / 2))
        True
    """
    models = list(models)
    for i, m in enumerate(models[1:], 1):
        check_compatible(models[0], m, names=("models[0]", f"models[{i}]"))
    w = _check_weights(weights, len(models))
    states = [{k: v.detach() for k, v in follow(m, models[0]).state_dict().items()} for m in models]
    avg = mean_state(states, w)
    out = copy.deepcopy(models[0])
    with torch.no_grad():
        for key, value in out.state_dict().items():
            value.copy_(avg[key])
    return out


def merge(
    models: Sequence[nn.Module],
    *,
    spec: PermutationSpec | None = None,
    example_inputs: Any = None,
    method: Method = "data_free",
    weights: Sequence[float] | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    reset_bn: bool = False,
    repair: bool = False,
    bn_data: Iterable[Any] | None = None,
    n_batches: int | None = 10,
    steps: int | None = None,
    seed: int | None = 0,
    progress: bool = True,
    threads: int | str | None = "auto",
) -> MergeResult:
    """Align ``models`` (N >= 2, one architecture) into one basin and average them.

    Args:
        models: the models (never modified); computation follows ``models[0]``'s device and dtype.
        spec: the permutation spec; traced from ``example_inputs`` (or the first batch of ``data``) if omitted.
        example_inputs: inputs for :func:`~rebasin_callbacks.trace_spec`.
        method: ``"naive"``, ``"star"``, ``"merge_many"``, ``"data_free"`` (default) or ``"data"`` (see
            the module docs).
        weights: merge weights (default equal); normalised to sum to 1.
        data: ``(inputs, targets)`` batches: the objective of ``method="data"``, and the default ``bn_data``.
        loss_fn: ``(outputs, targets) -> loss`` for ``method="data"`` (default cross-entropy).
        reset_bn / repair: recompute the merged model's BatchNorm statistics / apply REPAIR on ``bn_data``.
        bn_data: batches for ``reset_bn`` / ``repair`` (default ``data``); ``n_batches`` of them are used.
        steps: most Sinkhorn steps of ``"data_free"`` / ``"data"`` (default 100 / 150; both stop early).
        seed: seeds the visiting orders and the relaxation's initial noise.
        progress: print the phases (stderr).
        threads: CPU threads during the call (:func:`~rebasin_callbacks.utils.thread_limit`).

    Raises:
        ValueError / SpecMismatchError / TypeError: fewer than 2 models, different architectures, a spec that
            does not fit every model, NaN or inf weights, bad weights or options; raised before any work.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import merge
        >>> models = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        ...           for _ in range(3)]
        >>> result = merge(models, example_inputs=torch.randn(2, 4), method="merge_many", progress=False)
        >>> len(result.perms), result.merged(torch.randn(5, 4)).shape
        (3, torch.Size([5, 2]))
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"merge: method must be one of {', '.join(METHODS)}, got {method!r}")
    models = _check_models(models)
    w = _check_weights(weights, len(models))
    if method == "data" and data is None:
        raise ValueError("merge: method='data' needs data=... (batches of (inputs, targets))")
    if (reset_bn or repair) and bn_data is None and data is None:
        raise ValueError(f"merge: {'reset_bn' if reset_bn else 'repair'}=True needs bn_data=... or data=...")
    if steps is not None and not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"merge: steps must be an int >= 0, got {steps!r}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    lead = models[0]
    models = [lead] + [follow(m, lead) for m in models[1:]]
    with thread_limit(threads):
        if spec is None:
            _phase(f"merge: tracing the permutation spec of {type(lead).__name__}", progress)
        spec = _resolve_spec(models, spec, example_inputs, data)
        states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
        history: dict[str, list[float]] = {"distance": [distance_to_mean(states, w)]}
        n = len(models)
        _phase(f"merge: {n} models, {len(spec)} groups, method {method}", progress)
        equal = all(abs(x - w[0]) < 1e-12 for x in w)
        if method == "naive":
            perms = [identity_permutations(spec) for _ in models]
        elif method == "star":
            perms = star(states, spec, seed=seed)
        elif n == 2 and equal and method in ("data_free", "data"):
            perms = _align_pair(models, spec, method, data, loss_fn, steps, seed, history)
        else:
            t0 = time.perf_counter()
            rounds: list[float] = []
            perms = merge_many(states, spec, w, seed=seed, history=rounds)
            history["merge_many"] = rounds
            warm = time.perf_counter() - t0
            if method in ("data_free", "data"):
                default_steps = 150 if method == "data" else 100
                _phase(f"merge: MergeMany in {warm:.1f} s; Sinkhorn refinement of all {n} models", progress)
                perms, refine = refine_joint(
                    models, spec, w, perms,
                    data=data if method == "data" else None, loss_fn=loss_fn,
                    steps=default_steps if steps is None else steps,
                    # data-free: at most twice MergeMany's time more, so the whole merge stays within 3x
                    budget=None if method == "data" else 2 * warm, seed=seed,
                )  # fmt: skip
                history.update(refine)
        aligned = [permute(m, spec, p) for m, p in zip(models, perms)]
        history["distance"].append(distance_to_mean([a.state_dict() for a in aligned], w))
        seconds = time.perf_counter() - start
        merged = average_models(aligned, w)
        if reset_bn or repair:
            source = bn_data if bn_data is not None else data
            assert source is not None
            batches = take_batches(
                source, n_batches, module_device(merged), "merge", dtype=module_dtype(merged)
            )
            if reset_bn:
                from rebasin_callbacks.bn import reset_bn_stats_on

                reset_bn_stats_on(merged, batches)
            if repair:
                repair_many(aligned, merged, w, batches)
    _phase(f"merge: done in {seconds:.1f} s", progress)
    return MergeResult(perms, aligned, merged, spec, w, method, history, seconds)


def _align_pair(
    models: Sequence[nn.Module], spec: PermutationSpec, method: str, data: Iterable[Any] | None,
    loss_fn: Callable[[Any, Any], Tensor], steps: int | None, seed: int | None, history: dict[str, list[float]],
) -> list[Perms]:  # fmt: skip
    """Two models with equal weights: the merge objective is :func:`~rebasin_callbacks.align`'s, so it is
    align (model 1 into model 0's frame)."""
    from rebasin_callbacks.align import align

    kwargs: dict[str, Any] = {"spec": spec, "seed": seed, "progress": False}
    if steps is not None:
        kwargs["steps"] = steps
    if method == "data":
        kwargs.update(cost="mid", data=data, loss_fn=loss_fn)
    result = align(models[1], models[0], **kwargs)
    for k, v in result.history.items():
        history[k] = list(v)
    return [identity_permutations(spec), dict(result.perms)]


def repair_many(
    aligned: Sequence[nn.Module], merged: nn.Module, weights: Sequence[float], batches: Sequence[Any]
) -> None:
    """REPAIR for N models, in place: every unit of ``merged`` gets the weighted mean of the aligned models'
    mean and standard deviation on ``batches`` (moved to ``merged``'s device), layer by layer in execution
    order. :func:`merge` calls it with ``repair=True``."""
    from rebasin_callbacks.bn import collect_statistics, repair_points, repair_with_statistics

    points = repair_points(merged, split_batch(batches[0])[0])
    stats = [collect_statistics(follow(m, merged), points, batches) for m in aligned]
    goal = {
        p.name: (
            sum(w * s[p.name][0] for w, s in zip(weights, stats)),
            sum(w * s[p.name][1] for w, s in zip(weights, stats)),
        )
        for p in points
    }
    repair_with_statistics(merged, 0.0, points, goal, goal, batches, 1e-6)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_merge(
    models: Sequence[nn.Module],
    merged: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    weights: Sequence[float] | None = None,
    max_batches: int | None = None,
) -> MergeEvaluation:
    """Each model's loss and accuracy, the merged model's, the ensemble's (weighted mean of the logits) and
    the merged model's barrier (its loss minus the weighted mean of the models' losses), in one pass over
    ``data`` (eval mode; every module's mode restored).

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
        >>> ev = evaluate_merge([a, b], average_models([a, b]), data)
        >>> sorted(ev.merged), len(ev.models)
        (['accuracy', 'loss'], 2)
    """
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    w = _check_weights(weights, len(models))
    device, dtype = module_device(merged), module_dtype(merged)
    nets = [follow(m, merged) for m in models] + [merged]
    k = len(nets) + 1  # the models, the merged model, the ensemble
    loss = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.float64, device=device)
    count, acc_ok = 0, True
    modes = [[m.training for m in net.modules()] for net in nets]
    try:
        for net in nets:
            net.eval()
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(to_device(batch, device, dtype))
            outs = [net(x) for net in nets]
            outs.append(sum(wi * o for wi, o in zip(w, outs[:-1])))
            nb = y.shape[0] if y.dim() > 0 else 1
            for j, out in enumerate(outs):
                loss[j] += loss_fn(out, y).double() * nb
                if out.dim() == 2 and not y.is_floating_point() and y.dim() == 1:
                    correct[j] += (out.argmax(1) == y).sum().double()
                else:
                    acc_ok = False
            count += nb
    finally:
        for net, mode in zip(nets, modes):
            for m, t in zip(net.modules(), mode):
                m.training = t
    if count == 0:
        raise ValueError("evaluate_merge: the data yielded no batches")
    losses, accs = (loss / count).tolist(), (correct / count).tolist()
    metrics = [{"loss": lo, **({"accuracy": a} if acc_ok else {})} for lo, a in zip(losses, accs)]
    mean_loss = sum(wi * m["loss"] for wi, m in zip(w, metrics[: len(models)]))
    drop = (
        sum(wi * m["accuracy"] for wi, m in zip(w, metrics[: len(models)])) - metrics[-2]["accuracy"]
        if acc_ok
        else math.nan
    )
    return MergeEvaluation(
        metrics[: len(models)], metrics[-2], metrics[-1], metrics[-2]["loss"] - mean_loss, drop
    )


def _phase(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
