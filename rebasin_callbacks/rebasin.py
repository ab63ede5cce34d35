"""Learnable permutations: the ReBasin module and its functional view of the permuted model.

``ReBasin(model, spec)`` holds one score matrix per permutation group (groups of equal size share one
``[k, n, n]`` parameter so they go through one batched Sinkhorn call). Calling it returns a
:class:`PermutedView`: the wrapped model's structure with permuted tensors, evaluated through
``torch.func.functional_call``; the wrapped model itself is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rebasin_callbacks.permute import assignment, permute_state_dict
from rebasin_callbacks.seeds import as_generator
from rebasin_callbacks.settings import SinkhornSettings, settings_from
from rebasin_callbacks.sinkhorn import sinkhorn
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.spec_source import SpecLike, resolve_spec

__all__ = ["ReBasin", "PermutedView", "apply_soft_permutations", "auto_scale"]


class PermutedView:
    """A model's structure evaluated with other tensors (``functional_call``); callable like the model.

    Attributes:
        model: the module whose structure is used (never modified).
        state: the full state dict (parameters and buffers) to evaluate it with.
    """

    def __init__(self, model: nn.Module, state: Mapping[str, Tensor]):
        self.model = model
        self.state = dict(state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.state, args, kwargs, tie_weights=True, strict=False)

    def parameters(self) -> dict[str, Tensor]:
        """The floating-point entries that are parameters of the model (not buffers)."""
        names = {n for n, _ in self.model.named_parameters()}
        return {k: v for k, v in self.state.items() if k in names}


def _apply_matrix(value: Tensor, P: Tensor, axis: int) -> Tensor:
    # new = P @ old along `axis`: exactly the permutation-times-weight product, nothing more.
    moved = value.movedim(axis, 0)
    out = (P.to(value.dtype) @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape)
    return out.movedim(0, axis)


def apply_soft_permutations(
    state: Mapping[str, Tensor], spec: PermutationSpec, matrices: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict with ``P_g`` applied along every axis of group ``g`` (soft or hard matrices).

    An axis made of several groups' blocks (``spec.axis_blocks``) gets each block multiplied by its
    group's matrix. Block groups (``spec.block_axes``: heads) are applied first, each unit of a block
    moving its ``k`` entries together (``P_heads`` acts as ``P_heads (x) I_k``), then the groups inside."""
    out = dict(state)
    for key, axes in spec.axes_to_perm.items():
        value = out[key]
        if not value.is_floating_point():
            continue
        for axis, group in enumerate(axes):
            if key in spec.block_axes:
                value = _apply_blocks(value, spec.axis_blocks(key, axis, level="blocks"), matrices, axis)
            if group is None:
                continue
            if isinstance(group, str):
                if group in matrices:
                    value = _apply_matrix(value, matrices[group], axis)
                continue
            value = _apply_blocks(value, spec.axis_blocks(key, axis), matrices, axis)
        out[key] = value
    return out


def _apply_blocks(
    value: Tensor, blocks: list[tuple[str | None, int, int]], matrices: Mapping[str, Tensor], axis: int
) -> Tensor:
    if not any(g is not None and g in matrices for g, _, _ in blocks):
        return value
    parts = []
    for g, start, stop in blocks:
        part = value.narrow(axis, start, stop - start)
        if g is not None and g in matrices:
            n = matrices[g].shape[-1]
            if stop - start != n:  # a flattened block: each unit's k entries move together
                grouped = part.unflatten(axis, (n, (stop - start) // n))
                part = _apply_matrix(grouped, matrices[g], axis).flatten(axis, axis + 1)
            else:
                part = _apply_matrix(part, matrices[g], axis)
        parts.append(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


class ReBasin(nn.Module):
    """Learnable permutations of a model's hidden units, relaxed through Sinkhorn.

    Args:
        model: the model to permute (not modified; not registered as a submodule, so its
            parameters are not trained by an optimizer over ``rebasin.parameters()``).
        spec: the permutation spec (or a function ``model -> spec``, or a JSON path); traced from
            ``example_inputs`` when omitted (:func:`~rebasin_callbacks.spec_source.resolve_spec`). The
            spec used, sizes bound, is ``self.spec``; the one given is not modified.
        example_inputs: inputs for :func:`~rebasin_callbacks.trace_spec` when ``spec`` is omitted.
        init: ``"identity"`` (scores ``init_scale * I`` plus ``init_noise`` Gaussian jitter), ``"random"``,
            or a dict ``{group: LongTensor}`` of hard permutations to start from (e.g. weight matching).
        settings: the relaxation (:class:`~rebasin_callbacks.SinkhornSettings`: ``tau``, ``n_iters``,
            ``tol``, ``init_scale``, ``init_noise``, ``backward``, ``seed``); its defaults when omitted.
            ``init_scale="auto"`` adapts the margin to each group size ``n`` (:func:`auto_scale`: the
            initial permutation holds about half of each row's mass whatever ``n``; a fixed scale leaves
            wide layers almost uniform).
        tau / n_iters / tol / init_scale / init_noise / backward / seed: set one field of ``settings``
            (given ones win).

    Example:
        >>> import torch
        >>> from rebasin_callbacks import ReBasin
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> rb = ReBasin(mlp, example_inputs=torch.randn(4, 2))
        >>> view = rb()                      # soft permutations (training mode)
        >>> view(torch.randn(3, 2)).shape
        torch.Size([3, 1])
        >>> perms = rb.project()             # hard permutations {group: LongTensor}
    """

    def __init__(
        self,
        model: nn.Module,
        spec: SpecLike = None,
        example_inputs: Any = None,
        *,
        init: Literal["identity", "random"] | Mapping[str, Tensor] = "identity",
        settings: SinkhornSettings | None = None,
        tau: float | None = None,
        n_iters: int | None = None,
        tol: float | None = None,
        init_scale: float | Literal["auto"] | None = None,
        init_noise: float | None = None,
        backward: Literal["implicit", "unrolled"] | None = None,
        seed: int | torch.Generator | None = None,
    ):
        super().__init__()
        settings = settings_from(
            settings, SinkhornSettings(), tau=tau, n_iters=n_iters, tol=tol, init_scale=init_scale,
            init_noise=init_noise, backward=backward, seed=seed,
        )  # fmt: skip
        spec = resolve_spec(model, spec, example_inputs, purpose="nothing to learn")
        state = model.state_dict()
        self.spec = spec
        self._model = [model]  # a list keeps it out of the submodules (and out of .parameters())
        self.settings = settings
        self.tau, self.n_iters, self.tol = settings.temperature, settings.n_iters, settings.tol
        self.backward = settings.backward
        init_scale, init_noise = settings.init_scale, settings.init_noise

        ref = next(iter(state.values()))
        generator = as_generator(settings.seed)
        buckets: dict[int, list[str]] = {}
        for g in spec.groups:
            buckets.setdefault(spec.sizes[g], []).append(g)
        self._where: dict[str, tuple[str, int]] = {}
        self.scores = nn.ParameterDict()
        # bucket -> scale of its initial scores (an optimizer may scale its learning rate alike)
        self.scales: dict[str, float] = {}
        for n, groups in buckets.items():
            scale = auto_scale(n) if init_scale == "auto" else float(init_scale)
            self.scales[str(n)] = scale
            init_scores = torch.zeros(len(groups), n, n, dtype=torch.float32)
            for i, g in enumerate(groups):
                self._where[g] = (str(n), i)
                init_scores[i] = _initial_scores(n, init, g, scale, init_noise, generator)
            self.scores[str(n)] = nn.Parameter(init_scores.to(ref.device))

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def _bucket_matrices(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for n, scores in self.scores.items():
            P = sinkhorn(scores, tau=self.tau, n_iters=self.n_iters, tol=self.tol, backward=self.backward)
            out[n] = P
        return out

    def soft_permutations(self) -> dict[str, Tensor]:
        """``{group: doubly-stochastic [n, n] matrix}`` (differentiable w.r.t. the scores)."""
        mats = self._bucket_matrices()
        return {g: mats[b][i] for g, (b, i) in self._where.items()}

    def project(self) -> dict[str, Tensor]:
        """Hard permutations ``{group: LongTensor}`` by linear assignment on the current scores.

        One device-to-host copy per bucket of equal-size groups: the row-wise argmax of every group. Where
        it is a permutation it is the optimal assignment; only the other groups go to the CPU solver."""
        out: dict[str, Tensor] = {}
        for b, scores in self.scores.items():
            s = scores.detach()
            best = s.argmax(-1)  # [k, n]
            hits = torch.zeros_like(best).scatter_add_(-1, best, torch.ones_like(best))
            ok = ((hits == 1).all(-1) & torch.isfinite(s).flatten(1).all(-1)).cpu()
            best = best.cpu()
            for g, (bucket, i) in self._where.items():
                if bucket == b:
                    out[g] = best[i].clone() if bool(ok[i]) else assignment(s[i])
        return out

    def base_state(self) -> dict[str, Tensor]:
        """The wrapped model's state (detached: gradients flow only to the scores)."""
        return {k: v.detach() for k, v in self.model.state_dict(keep_vars=True).items()}

    def permuted_state(
        self, perms: Mapping[str, Tensor] | None = None, *, soft: bool | None = None
    ) -> dict[str, Tensor]:
        """The model's state dict permuted by ``perms`` (hard), or by the current soft/hard permutations."""
        state = self.base_state()
        if perms is not None:
            return permute_state_dict(state, self.spec, perms)
        if soft is None:
            soft = self.training
        if soft:
            return apply_soft_permutations(state, self.spec, self.soft_permutations())
        return permute_state_dict(state, self.spec, self.project())

    def forward(self) -> PermutedView:
        """The permuted model as a callable view (soft in training mode, hard in eval mode)."""
        return PermutedView(self.model, self.permuted_state())


def auto_scale(n: int) -> float:
    """Score margin that gives the initial permutation about half of each row's Sinkhorn mass:
    ``e^s / (e^s + n - 1) = 1/2``, i.e. ``s = log(n - 1)`` (at least 1)."""
    return max(1.0, math.log(max(n - 1, 1)))


def _initial_scores(
    n: int,
    init: Literal["identity", "random"] | Mapping[str, Tensor],
    group: str,
    scale: float,
    noise: float,
    generator: torch.Generator | None,
) -> Tensor:
    jitter = noise * torch.randn(n, n, generator=generator)
    if isinstance(init, Mapping):
        if group not in init:
            return scale * torch.eye(n) + jitter
        perm = init[group].cpu()
        scores = torch.zeros(n, n)
        scores[torch.arange(n), perm] = scale
        return scores + jitter
    if init == "identity":
        return scale * torch.eye(n) + jitter
    if init == "random":
        return torch.randn(n, n, generator=generator)
    raise ValueError(f"init must be 'identity', 'random' or a dict of permutations, got {init!r}")
