"""Apply hard permutations exactly: parameters, buffers (BatchNorm statistics) and optimizer state.

A permutation of group ``g`` is a LongTensor ``perm`` of length ``spec.sizes[g]``; it maps every axis the
group acts on by ``new = old.index_select(axis, perm)`` (Git Re-Basin's ``take`` convention). As a matrix,
``P[i, perm[i]] = 1`` and ``new = P @ old`` along that axis.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TypeVar, overload

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.utils import as_generator

__all__ = [
    "assignment",
    "permute",
    "permute_state_dict",
    "random_permutations",
    "identity_permutations",
    "invert_permutation",
    "perm_to_matrix",
    "axis_index",
    "permute_optimizer_state",
    "compose_permutations",
    "invert_permutations",
]

Perms = Mapping[str, Tensor]
M = TypeVar("M", bound=nn.Module)


def assignment(scores: Tensor) -> Tensor:
    """The permutation maximising ``sum_i scores[i, perm[i]]`` (scipy's linear_sum_assignment).

    When every row's maximum sits in a different column, that argmax is optimal (each term is as
    large as it can be) and the solver is skipped: the common case once scores are near a permutation.
    """
    scores = scores.detach()
    best = scores.argmax(-1).cpu()
    if torch.bincount(best, minlength=scores.shape[-1]).max() == 1 and bool(torch.isfinite(scores).all()):
        return best
    cost = scores.to("cpu", torch.float64).numpy()
    if not np.isfinite(cost).all():
        raise ValueError("assignment scores contain NaN or inf")
    _, cols = linear_sum_assignment(cost, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def random_permutations(
    spec: PermutationSpec, seed: int | torch.Generator | None = None
) -> dict[str, Tensor]:
    """One uniformly random permutation per group (on the CPU; pass a ``seed``, an int or a generator, to
    repeat)."""
    _require_sizes(spec)
    generator = as_generator(seed)
    return {g: torch.randperm(n, generator=generator) for g, n in spec.sizes.items()}


def identity_permutations(spec: PermutationSpec) -> dict[str, Tensor]:
    """The identity permutation for every group."""
    _require_sizes(spec)
    return {g: torch.arange(n) for g, n in spec.sizes.items()}


def invert_permutation(perm: Tensor) -> Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def compose_permutations(spec: PermutationSpec, first: Perms, then: Perms) -> dict[str, Tensor]:
    """The permutations that do ``first`` and then ``then``: ``permute`` with them equals ``permute`` with
    ``first`` followed by ``permute`` with ``then`` (groups left out of either are the identity).

    Group by group (``first[g][then[g]]``) except inside block groups (attention heads, groups of
    channels): a unit group at block position ``i`` after the blocks moved takes ``first``'s permutation of
    the block that landed there, so it is read back from the composed index of the whole axis.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import trace_spec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> spec = trace_spec(mlp, torch.randn(3, 2))
        >>> p = random_permutations(spec, 0)
        >>> all(torch.equal(q, torch.arange(4)) for q in compose_permutations(spec, p, invert_permutations(spec, p)).values())
        True
    """
    _require_sizes(spec)
    full = [
        {g: q.cpu() for g, q in {**identity_permutations(spec), **perms}.items()} for perms in (first, then)
    ]
    _check_perms(spec, full[0])
    _check_perms(spec, full[1])
    blocks = {h: full[0][h][full[1][h]] for h in spec.block_groups}

    def index(key: str, axis: int) -> Tensor:
        a = axis_index(spec, key, axis, full[0], torch.device("cpu"))
        b = axis_index(spec, key, axis, full[1], torch.device("cpu"))
        return a[b]  # type: ignore[index]

    return _from_axis_indices(spec, index, blocks)


def invert_permutations(spec: PermutationSpec, perms: Perms) -> dict[str, Tensor]:
    """The permutations that undo ``perms``: ``compose_permutations(spec, perms, inverse)`` is the identity."""
    _require_sizes(spec)
    full = {g: q.cpu() for g, q in {**identity_permutations(spec), **perms}.items()}
    _check_perms(spec, full)
    blocks = {h: invert_permutation(full[h]) for h in spec.block_groups}

    def index(key: str, axis: int) -> Tensor:
        return invert_permutation(axis_index(spec, key, axis, full, torch.device("cpu")))  # type: ignore[arg-type]

    return _from_axis_indices(spec, index, blocks)


def _from_axis_indices(spec: PermutationSpec, index, blocks: dict[str, Tensor]) -> dict[str, Tensor]:  # noqa: ANN001
    """Per-group permutations whose axis indices are ``index(key, axis)``, with the block groups given: a
    unit group's permutation is read from its first axis, after the block level is taken off."""
    out = dict(blocks)
    for g, pairs in spec.perm_to_axes.items():
        if g in out:
            continue
        key, axis = pairs[0]
        full = index(key, axis)
        outer = axis_index(spec, key, axis, blocks, torch.device("cpu"), level="blocks")
        units = full if outer is None else invert_permutation(outer)[full]
        start, stop = next((s, e) for grp, s, e in spec.axis_blocks(key, axis) if grp == g)
        k = (stop - start) // spec.sizes[g]
        out[g] = (units[start:stop:k] - start) // k
    return out


def perm_to_matrix(perm: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The permutation matrix with ``P[i, perm[i]] = 1``."""
    n = perm.numel()
    P = torch.zeros(n, n, dtype=dtype, device=perm.device)
    P[torch.arange(n, device=perm.device), perm] = 1
    return P


def _require_sizes(spec: PermutationSpec) -> None:
    if set(spec.sizes) != set(spec.perm_to_axes):
        missing = sorted(set(spec.perm_to_axes) - set(spec.sizes))
        raise SpecMismatchError(
            f"spec has no size for groups {missing[:5]}; build it with PermutationSpec.from_axes(axes, state_dict)"
        )


def _check_perms(spec: PermutationSpec, perms: Perms) -> None:
    unknown = set(perms) - set(spec.perm_to_axes)
    if unknown:
        raise SpecMismatchError(f"perms name groups the spec does not have: {sorted(unknown)[:5]}")
    for g, p in perms.items():
        n = spec.sizes.get(g)
        if p.ndim != 1 or (n is not None and p.numel() != n):
            raise SpecMismatchError(f"perm for group {g!r} has shape {tuple(p.shape)}, expected ({n},)")
        if p.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"perm for group {g!r} must be an integer tensor, got {p.dtype}")
        if not torch.equal(torch.sort(p.cpu()).values, torch.arange(p.numel())):
            raise ValueError(f"perm for group {g!r} is not a permutation of 0..{p.numel() - 1}")


def axis_index(
    spec: PermutationSpec,
    key: str,
    axis: int,
    perms: Perms,
    device: torch.device,
    *,
    level: str | None = None,
) -> Tensor | None:
    """The index that permutes ``axis`` of ``key`` (``None`` when no given permutation touches it).

    A plain axis uses its group's permutation; a block axis concatenates each block's permutation shifted
    by the block's offset (identity for fixed blocks and for groups not in ``perms``). A flattened block
    (``k`` entries per unit) moves each unit's ``k`` entries together. Block groups (``spec.block_axes``,
    attention heads) act first and the unit groups inside the moved blocks: the index is
    ``blocks_index[units_index]``. ``level="blocks"`` or ``"units"`` gives one level alone."""
    if level is not None:
        return _level_index(spec.axis_blocks(key, axis, level=level), perms, device)
    units = _level_index(spec.axis_blocks(key, axis), perms, device)
    if key not in spec.block_axes:
        return units
    blocks = _level_index(spec.axis_blocks(key, axis, level="blocks"), perms, device)
    if blocks is None or units is None:
        return units if blocks is None else blocks
    return blocks[units]


def _level_index(
    blocks: list[tuple[str | None, int, int]], perms: Perms, device: torch.device
) -> Tensor | None:
    if not any(g is not None and g in perms for g, _, _ in blocks):
        return None
    parts = []
    for g, start, stop in blocks:
        if g is None or g not in perms:
            parts.append(torch.arange(start, stop, device=device))
            continue
        perm = perms[g].to(device)
        k = (stop - start) // len(perm)
        if k > 1:
            perm = (perm[:, None] * k + torch.arange(k, device=device)).reshape(-1)
        parts.append(perm + start)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _permute_tensor(value: Tensor, spec: PermutationSpec, key: str, perms: Perms) -> Tensor:
    for axis in range(value.ndim):
        index = axis_index(spec, key, axis, perms, value.device)
        if index is not None:
            value = value.index_select(axis, index)
    return value


def permute_state_dict(
    state_dict: Mapping[str, Tensor], spec: PermutationSpec, perms: Perms
) -> dict[str, Tensor]:
    """A new state dict with every entry the spec names permuted; other entries are shared, not copied."""
    _check_perms(spec, perms)
    out = dict(state_dict)
    for key, axes in spec.axes_to_perm.items():
        if key not in out:
            raise SpecMismatchError(f"spec names {key!r} but the state dict has no such entry")
        value = out[key]
        if value.ndim != len(axes):
            raise SpecMismatchError(
                f"{key!r} has shape {tuple(value.shape)} but the spec gives {len(axes)} axes: {axes}"
            )
        out[key] = _permute_tensor(value, spec, key, perms)
    return out


@overload
def permute(
    model: M,
    spec: PermutationSpec,
    perms: Perms,
    *,
    optimizer: torch.optim.Optimizer | None = ...,
    inplace: bool = ...,
) -> M: ...
@overload
def permute(
    model: Mapping[str, Tensor],
    spec: PermutationSpec,
    perms: Perms,
    *,
    optimizer: torch.optim.Optimizer | None = ...,
    inplace: bool = ...,
) -> dict[str, Tensor]: ...
def permute(model, spec, perms, *, optimizer=None, inplace=False):
    """Apply hard permutations to a model or a state dict, exactly (``index_select``).

    Args:
        model: an ``nn.Module`` or a state dict.
        spec: which axes each group acts on.
        perms: ``{group: LongTensor}``; groups left out stay as they are.
        optimizer: with ``inplace=True``, its per-parameter state (Adam moments, SGD momentum, factored
            statistics such as Adafactor's; see :func:`permute_optimizer_state`) is permuted the same way.
            Every entry is checked before anything changes: an entry that cannot be permuted raises and
            leaves the model and the optimizer untouched.
        inplace: permute the module's own tensors (parameter identity is kept, so optimizers and hooks
            that hold them still work). Otherwise a permuted deep copy is returned.

    Returns:
        The permuted module (the same object when ``inplace``) or a new state dict.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import permute, random_permutations, trace_spec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> spec = trace_spec(mlp, torch.randn(3, 2))
        >>> x = torch.randn(5, 2)
        >>> permuted = permute(mlp, spec, random_permutations(spec))
        >>> bool(torch.allclose(permuted(x), mlp(x), atol=1e-6))
        True
    """
    if optimizer is not None and not inplace:
        raise ValueError(
            "optimizer=... only makes sense with inplace=True (the optimizer holds the original tensors)"
        )
    if not isinstance(model, nn.Module):
        if inplace:
            raise ValueError("inplace=True needs an nn.Module, not a state dict")
        return permute_state_dict(model, spec, perms)

    target = model if inplace else copy.deepcopy(model)
    state = target.state_dict(keep_vars=True)
    _check_perms(spec, perms)
    # all-or-nothing: every new tensor (parameters, buffers, optimizer state) is computed and checked first;
    # only then is anything written, so a bad entry leaves the model and the optimizer as they were
    new_values = permute_state_dict({k: v.detach() for k, v in state.items()}, spec, perms)
    plan = _optimizer_plan(optimizer, state, spec, perms) if optimizer is not None else []
    with torch.no_grad():
        for key in spec.axes_to_perm:
            state[key].copy_(new_values[key])
        for tensor, value in plan:
            tensor.copy_(value)
    return target


def permute_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Mapping[str, Tensor], spec: PermutationSpec, perms: Perms
) -> None:
    """Permute ``optimizer``'s per-parameter state (moments, momentum) like the parameters themselves.

    ``state`` is the model's ``state_dict(keep_vars=True)``, which maps spec keys to the parameter objects
    the optimizer holds. :func:`permute` calls this with ``inplace=True, optimizer=...``; call it directly
    for further optimizers of the same model.

    Which state entries are permuted, and how:

    - the parameter's shape (Adam's moments, SGD's momentum): like the parameter;
    - the parameter's number of dimensions with some sizes 1 (factored statistics, e.g. Adafactor's
      ``row_var`` ``(out, 1)`` and ``col_var`` ``(1, in)``): along the full-size axes; a size-1 axis is a
      reduction over that axis, which a permutation does not change;
    - a vector whose length is that of exactly one axis of the parameter (a row or column factor): along
      that axis (several axes of that length are accepted only when they are permuted the same way);
    - scalars (step counts): untouched.

    Anything else is refused with :class:`SpecMismatchError` before any state is changed (all-or-nothing).

    Example:
        >>> import torch
        >>> from rebasin_callbacks import random_permutations, trace_spec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
        >>> mlp(torch.randn(3, 2)).sum().backward(); opt.step()
        >>> spec = trace_spec(mlp, torch.randn(3, 2))
        >>> _ = permute(mlp, spec, random_permutations(spec), optimizer=opt, inplace=True)
    """
    _check_perms(spec, perms)
    plan = _optimizer_plan(optimizer, state, spec, perms)
    with torch.no_grad():
        for tensor, value in plan:
            tensor.copy_(value)


def _optimizer_plan(
    optimizer: torch.optim.Optimizer, state: Mapping[str, Tensor], spec: PermutationSpec, perms: Perms
) -> list[tuple[Tensor, Tensor]]:
    """``[(state tensor, its permuted value)]`` for every entry to change; raises before anything changes."""
    by_id = {id(t): key for key, t in state.items()}
    plan: list[tuple[Tensor, Tensor]] = []
    for param, param_state in optimizer.state.items():
        key = by_id.get(id(param))
        if key is None or key not in spec.axes_to_perm:
            continue
        for name, value in param_state.items():
            if not isinstance(value, Tensor) or value.ndim == 0 or value.numel() == 1:
                continue  # scalars (step counts) do not depend on the order of hidden units
            new = _permute_state_entry(value, param, spec, key, perms, name)
            if new is not None:
                plan.append((value, new))
    return plan


def _permute_state_entry(
    value: Tensor, param: Tensor, spec: PermutationSpec, key: str, perms: Perms, name: str
) -> Tensor | None:
    shape, pshape = tuple(value.shape), tuple(param.shape)
    if shape == pshape:
        return _permute_tensor(value, spec, key, perms)
    if len(shape) == len(pshape) and all(s in (1, p) for s, p in zip(shape, pshape)):
        out = value
        for axis, (s, p) in enumerate(zip(shape, pshape)):
            index = axis_index(spec, key, axis, perms, value.device)
            if index is not None and s == p and p > 1:
                out = out.index_select(axis, index)
        return out
    if len(shape) == 1:
        axes = [axis for axis, p in enumerate(pshape) if p == shape[0]]
        indices = [axis_index(spec, key, axis, perms, value.device) for axis in axes]
        identity = torch.arange(shape[0], device=value.device)
        distinct = {tuple((i if i is not None else identity).tolist()) for i in indices}
        if len(distinct) == 1:
            index = indices[0]
            return value if index is None else value.index_select(0, index)
        if len(axes) > 1:
            raise SpecMismatchError(
                f"optimizer state {name!r} of {key!r} has shape {shape}, which fits axes {axes} of the "
                f"parameter's {pshape}, and they are permuted differently: cannot tell which it follows; "
                "nothing was changed"
            )
    raise SpecMismatchError(
        f"optimizer state {name!r} of {key!r} has shape {shape}, neither the parameter's {pshape}, a factored "
        "statistic of it (same dimensions, some of size 1), a row/column vector of one axis nor a scalar: "
        "cannot permute it; nothing was changed"
    )
