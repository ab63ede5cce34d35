"""Weight matching (Git Re-Basin's coordinate descent) as a baseline and as the warm start of :func:`align`.

For every permutation group ``g`` the similarity ``S[i, j] = sum <B_i, A_j>`` adds up, over every
state_dict entry the group acts on (weights, biases, norm weights, BatchNorm statistics: anything
floating-point), the inner products of row ``i`` of the reference ``B`` with row ``j`` of the model ``A``
along that axis, with ``A``'s other axes permuted by the current permutations. ``perm = argmax_perm
sum_i S[i, perm[i]]`` is a linear assignment (scipy), and groups are updated in turn until none changes.

Two details make it exact on planted permutations far more often than the textbook version:

* 1-D entries (biases, norm weights, running statistics) enter as outer products ``b a^T``, not as a
  constant ``a @ b``;
* the first sweep is *greedy*: a group is solved from the entries whose other axes are already known
  (unpermuted, or solved earlier in the sweep), most-constrained group first, instead of from the
  identity guess for every other group, which sends coordinate descent into local optima.

Speed: similarities are computed on the model's device, in its precision; a group is solved again only
when a group it shares a tensor with changed since its last solve (otherwise its similarity, hence its
answer, is the same), and the descent stops once no group is left to solve. An assignment whose row
maxima already fall in distinct columns needs no solver (the common case near a permutation).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rebasin_callbacks.permute import assignment, axis_index
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.spec_source import resolve_spec
from rebasin_callbacks.states import check_compatible, check_finite

__all__ = [
    "weight_matching",
    "check_finite",
]

Block = tuple[str | None, int, int]
#: memory for cached similarity terms (per call), e.g. 16 MiB per 2048-wide term in float32
_CACHE_BYTES = 1 << 30


class MatchingProblem:
    """Both models' tensors restricted to the spec, with the per-group term lists precomputed."""

    def __init__(
        self, spec: PermutationSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor], solver: str = "auto"
    ):
        self.spec = spec
        self.solver = solver
        self.a, self.b = a, b
        # group -> [(key, axis, [(start, stop), ...] blocks of this group on that axis)]
        self.terms: dict[str, list[tuple[str, int, list[tuple[int, int]]]]] = {}
        self.block_groups = spec.block_groups
        for g, pairs in spec.perm_to_axes.items():
            seen: set[tuple[str, int]] = set()
            terms = []
            level = "blocks" if g in self.block_groups else "units"
            for key, axis in pairs:
                if (key, axis) in seen or key not in a:
                    continue
                seen.add((key, axis))
                blocks = [(s, e) for grp, s, e in self.blocks(key, axis, level) if grp == g]
                terms.append((key, axis, blocks))
            self.terms[g] = terms
        # A unit group's term on an axis that block groups also act on depends on them: the units sit
        # inside the moved blocks.
        self._deps = {
            (k, ax): sorted(self.other_groups(k, ax) | self.block_groups_on(k, ax))
            for ts in self.terms.values()
            for k, ax, _ in ts
        }
        # block group -> the unit groups it fully determines (one per block and role, found only inside it)
        self._owned: dict[str, set[str]] = {h: self._owned_groups(h) for h in self.block_groups}
        # block group -> {(role, i, j): the within-block permutation of the role for reference block i
        # and model block j}, from its last solve
        self._inner: dict[str, dict[tuple[tuple[str | None, ...], int, int], Tensor]] = {}
        # (group, key, axis) -> (the permutations it was computed with, its n x n term). A term is computed
        # again only when one of those changed: after one group changes, its dependents recompute the
        # terms it appears in, not their whole similarity. Bounded, as these are n x n each.
        self._cache: dict[tuple[str, str, int], tuple[tuple[Tensor, ...], Tensor]] = {}
        self._cache_budget = _CACHE_BYTES

    @classmethod
    def from_states(
        cls, spec: PermutationSpec, sa: Mapping[str, Tensor], sb: Mapping[str, Tensor], solver: str = "auto"
    ) -> MatchingProblem:
        """The problem of matching state ``sa`` to ``sb`` (every floating-point entry the spec permutes)."""

        def prep(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
            # Matching needs no gradients; float32 keeps half-precision models accurate enough.
            return {
                k: v.detach().float() if v.dtype != torch.float64 else v.detach()
                for k, v in state.items()
                if k in spec.axes_to_perm and v.is_floating_point()
            }

        a, b = prep(sa), prep(sb)
        if a:
            device = next(iter(a.values())).device
            b = {k: v.to(device) for k, v in b.items()}
        return cls(spec, a, b, solver)

    def descend(
        self, *, n_iters: int = 100, init: Mapping[str, Tensor] | None = None, seed: int | None = None
    ) -> dict[str, Tensor]:
        """Coordinate descent from ``init`` (default: the greedy sweep) until no group changes. The
        similarity cache is kept between calls, so a second descent from nearby permutations (align's
        polish) recomputes only the terms whose neighbours differ."""
        spec = self.spec
        rng = torch.Generator().manual_seed(0 if seed is None else int(seed))
        if init is not None:
            unknown = set(init) - set(spec.perm_to_axes)
            if unknown:
                raise SpecMismatchError(f"init names groups the spec does not have: {sorted(unknown)[:5]}")
            perms = {g: torch.arange(n) for g, n in spec.sizes.items()}
            perms.update({g: p.detach().cpu().long() for g, p in init.items()})
        else:
            perms = self.greedy(rng)

        groups = list(spec.perm_to_axes)
        dependents = self.dependents()
        # Every group is solved once with all the others known; after that only the groups whose
        # similarity changed (a group they depend on got a new permutation) can change.
        dirty = set(groups)
        for _ in range(n_iters):
            if not dirty:
                break
            for i in torch.randperm(len(groups), generator=rng).tolist():
                g = groups[i]
                if g not in dirty:
                    continue
                dirty.discard(g)
                S = self.similarity(g, perms)
                new_perm = _assign(S, g, self.solver)
                if torch.equal(new_perm, perms[g]):
                    continue
                rows = torch.arange(S.shape[0], device=S.device)
                # Scores summed in float64 on the device; two numbers come back.
                picked = [S[rows, p.to(S.device)].double().sum() for p in (perms[g], new_perm)]
                old, new = torch.stack(picked).tolist()
                if new > old + 1e-12 * max(1.0, abs(old)):
                    perms[g] = new_perm
                    dirty |= dependents[g]
                    if g in self.block_groups:  # the units inside the moved blocks follow them
                        for inner in self.adopt(g, new_perm, perms):
                            dirty |= dependents[inner]
        return perms

    def blocks(self, key: str, axis: int, level: str = "units") -> list[Block]:
        return self.spec.axis_blocks(key, axis, level=level)

    def block_groups_on(self, key: str, axis: int) -> set[str]:
        return {g for g, _, _ in self.blocks(key, axis, "blocks") if g is not None}

    def other_groups(self, key: str, axis: int) -> set[str]:
        """Groups acting on any axis of ``key`` other than ``axis`` (both levels)."""
        out: set[str] = set()
        for ax in range(self.a[key].ndim):
            if ax != axis:
                out.update(g for g, _, _ in self.blocks(key, ax) if g is not None)
                out.update(self.block_groups_on(key, ax))
        return out

    def _owned_groups(self, h: str) -> set[str]:
        """Unit groups that only ever appear inside ``h``'s blocks, a different one in each block."""
        inside: set[str] = set()
        for key, axis, _ in self.terms[h]:
            inside.update(g for g, _, _ in self.blocks(key, axis) if g is not None)
        owned = set()
        for g in inside:
            pairs = self.spec.perm_to_axes[g]
            if all(h in self.block_groups_on(k, ax) for k, ax in pairs if k in self.a):
                owned.add(g)
        for roles in self._roles(h).values():
            for role in roles:
                if len(set(role)) != len(role):  # the same group in several blocks: shared, not owned
                    owned -= set(role)
        return owned

    def _roles(self, h: str) -> dict[tuple[str, int], list[tuple[str | None, ...]]]:
        """Per term of block group ``h``: the unit group at each relative position of its blocks, as one
        tuple per sub-block (the group in block 0, block 1, ...)."""
        n = self.spec.sizes[h]
        out: dict[tuple[str, int], list[tuple[str | None, ...]]] = {}
        for key, axis, hblocks in self.terms[h]:
            units = self.blocks(key, axis)
            roles = []
            for start, stop in hblocks:
                k = (stop - start) // n
                for _g, s, e in units or [(None, start, start + k)]:
                    if start <= s and e <= start + k:  # a sub-block of block 0: its role in every block
                        roles.append(tuple(self._unit_at(units, s + i * k) for i in range(n)))
            out[(key, axis)] = roles
        return out

    @staticmethod
    def _unit_at(units: list[Block], pos: int) -> str | None:
        return next((g for g, s, e in units if s <= pos < e), None)

    def similarity(
        self,
        g: str,
        perms: Mapping[str, Tensor],
        known: set[str] | None = None,
        keys: Collection[str] | None = None,
    ) -> Tensor:
        """``S[i, j] = sum <B_i, A_j>`` over the entries of group ``g``; with ``known``, only the entries
        whose other axes are all unpermuted or in ``known``; with ``keys``, only those entries."""
        if g in self.block_groups:
            return self.block_similarity(g, perms, known, keys)
        n = self.spec.sizes[g]
        S: Tensor | None = None
        for key, axis, blocks in self.terms[g]:
            if keys is not None and key not in keys:
                continue
            deps = self._deps[(key, axis)]
            if known is not None and not set(deps) <= known:
                continue
            used = tuple(perms[h] for h in deps)
            hit = self._cache.get((g, key, axis))
            if hit is not None and all(x is y for x, y in zip(hit[0], used)):
                term = hit[1]
            else:
                update = None if hit is None else self._updated_term(key, axis, blocks, deps, hit, perms)
                term = self._term(n, key, axis, blocks, perms) if update is None else update
                size = term.numel() * term.element_size()
                if hit is not None:
                    self._cache_budget += size
                if size <= self._cache_budget:
                    self._cache[(g, key, axis)] = (used, term)
                    self._cache_budget -= size
                else:
                    self._cache.pop((g, key, axis), None)
            S = term if S is None else S + term
        if S is None:
            device = next(iter(self.a.values())).device if self.a else None
            return torch.zeros(n, n, device=device)
        return S

    def _term(
        self, n: int, key: str, axis: int, blocks: list[tuple[int, int]], perms: Mapping[str, Tensor]
    ) -> Tensor:
        return _block_products(n, axis, blocks, self._permuted_others(key, axis, perms), self.b[key])

    def _permuted_others(self, key: str, axis: int, perms: Mapping[str, Tensor]) -> Tensor:
        """``A[key]`` with every axis but ``axis`` permuted, and ``axis`` by its block groups only."""
        a = self.a[key]
        for ax in range(a.ndim):
            level = "blocks" if ax == axis else None
            if level is not None and key not in self.spec.block_axes:
                continue
            idx = axis_index(self.spec, key, ax, perms, a.device, level=level)
            if idx is not None:
                a = a.index_select(ax, idx)
        return a

    def _updated_term(
        self,
        key: str,
        axis: int,
        blocks: list[tuple[int, int]],
        deps: list[str],
        hit: tuple[tuple[Tensor, ...], Tensor],
        perms: Mapping[str, Tensor],
    ) -> Tensor | None:
        """The cached term moved to the current permutations by computing only what changed, or ``None``
        when recomputing it is as cheap (more than one axis changed, or over half of the changed axis).

        A term is a sum over the positions ``r`` of the other axes of ``B[r] A[index(r)]^T``: when the index
        of one axis differs at positions ``c`` only, the new term is the old one plus
        ``B[c] (A[new[c]] - A[old[c]])^T``, a product ``|c| / size`` times the size of the full one. Most
        later sweeps of the descent move a few units of a neighbour (a few percent of a 4096-wide layer)."""
        old_used, old_term = hit
        old_perms = dict(zip(deps, old_used))
        a, b = self.a[key], self.b[key]
        if key in self.spec.block_axes:  # blocks moved along the term's own axis: recompute
            new_own = axis_index(self.spec, key, axis, perms, a.device, level="blocks")
            old_own = axis_index(self.spec, key, axis, old_perms, a.device, level="blocks")
            if new_own is not None and (old_own is None or not torch.equal(new_own, old_own)):
                return None
        changed: tuple[int, Tensor, Tensor] | None = None
        unchanged: list[tuple[int, Tensor]] = []
        for ax in range(a.ndim):
            if ax == axis:
                continue
            new_idx = axis_index(self.spec, key, ax, perms, a.device)
            old_idx = axis_index(self.spec, key, ax, old_perms, a.device)
            if new_idx is None or old_idx is None:
                continue
            if torch.equal(new_idx, old_idx):
                unchanged.append((ax, new_idx))
                continue
            if changed is not None:
                return None
            changed = (ax, old_idx, new_idx)
        if changed is None:  # the common case in a refinement step: nothing to copy or multiply
            return old_term
        ax, old_idx, new_idx = changed
        pos = (old_idx != new_idx).nonzero().squeeze(1)
        if 2 * pos.numel() > a.shape[ax]:
            return None
        for other, idx in unchanged:
            a = a.index_select(other, idx)
        diff = a.index_select(ax, new_idx[pos]) - a.index_select(ax, old_idx[pos])
        return old_term + _block_products(old_term.shape[0], axis, blocks, diff, b.index_select(ax, pos))

    def block_similarity(
        self,
        h: str,
        perms: Mapping[str, Tensor],
        known: set[str] | None = None,
        keys: Collection[str] | None = None,
    ) -> Tensor:
        """``S[i, j]``: how well model block ``j`` matches reference block ``i`` with the best permutation
        inside the block: for every role (the unit group at one place of a block: a head's query/key
        channels, its value channels), the value of the assignment that best matches block ``j``'s units
        to block ``i``'s, summed over roles; a fixed sub-block adds its plain inner product. The
        within-block assignments are kept for :meth:`adopt` (n^2 small assignments per role, one of the
        n x n blocks)."""
        n = self.spec.sizes[h]
        roles = self._roles(h)
        per_role: dict[tuple[str | None, ...], Tensor] = {}
        fixed: Tensor | None = None
        for key, axis, hblocks in self.terms[h]:
            if keys is not None and key not in keys:
                continue
            if known is not None and not self.other_groups(key, axis) <= known:
                continue
            a, b = self._permuted_others(key, axis, {g: p for g, p in perms.items() if g != h}), self.b[key]
            units = self.blocks(key, axis)
            r = 0
            for start, stop in hblocks:
                k = (stop - start) // n
                for _, s0, e0 in units or [(None, start, start + k)]:
                    if not (start <= s0 and e0 <= start + k):
                        continue
                    role = roles[(key, axis)][r]
                    r += 1
                    off, length = s0 - start, e0 - s0
                    # (block, entries of the sub-block, rest): block i's sub-block at start + i * k + off
                    idx = (start + off + torch.arange(n, device=a.device)[:, None] * k
                           + torch.arange(length, device=a.device)).reshape(-1)  # fmt: skip
                    a_sub = a.index_select(axis, idx).movedim(axis, 0).reshape(n, length, -1)
                    b_sub = b.index_select(axis, idx).movedim(axis, 0).reshape(n, length, -1)
                    m = self.spec.sizes[role[0]] if role[0] is not None else 0
                    if role[0] is None or m == 0:
                        term = torch.einsum("ilr,jlr->ij", b_sub, a_sub)
                        fixed = term if fixed is None else fixed + term
                        continue
                    # units flattened with length // m entries each
                    a_u = a_sub.reshape(n, m, -1)
                    b_u = b_sub.reshape(n, m, -1)
                    term = torch.einsum("iur,jvr->ijuv", b_u, a_u)
                    per_role[role] = term if role not in per_role else per_role[role] + term
        S = torch.zeros(n, n, dtype=torch.float64) if fixed is None else fixed.double().cpu()
        inner: dict[tuple[tuple[str | None, ...], int, int], Tensor] = {}
        for role, term in per_role.items():
            cost = term.double().cpu()
            for i in range(n):
                for j in range(n):
                    perm = assignment(cost[i, j])
                    inner[(role, i, j)] = perm
                    S[i, j] += cost[i, j][torch.arange(len(perm)), perm].sum()
        self._inner[h] = inner
        return S

    def adopt(self, h: str, perm: Tensor, perms: dict[str, Tensor]) -> set[str]:
        """Set the unit groups ``h`` owns to the within-block assignments of ``h``'s last solve for the
        block pairs ``perm`` chose; returns the groups that changed."""
        changed = set()
        for (role, i, j), inner in self._inner.get(h, {}).items():
            g = role[i]
            if j != int(perm[i]) or g is None or g not in self._owned[h]:
                continue
            if not torch.equal(perms[g], inner):
                perms[g] = inner
                changed.add(g)
        return changed

    def dependents(self) -> dict[str, set[str]]:
        """``{h: groups whose similarity depends on h's permutation}`` (a group may depend on itself)."""
        out: dict[str, set[str]] = {g: set() for g in self.terms}
        for g, terms in self.terms.items():
            for key, axis, _ in terms:
                for h in self._deps[(key, axis)]:
                    out[h].add(g)
        return out

    def greedy(self, rng: torch.Generator) -> dict[str, Tensor]:
        """One sweep, most-constrained group first, each solved from what is already known."""
        perms: dict[str, Tensor] = {}
        known: set[str] = set()
        remaining = list(self.spec.perm_to_axes)
        while remaining:

            def mass(g: str) -> int:
                return sum(
                    self.a[k].numel() for k, ax, _ in self.terms[g] if set(self._deps[(k, ax)]) - {g} <= known
                )

            g = max(remaining, key=mass)
            perms[g] = _assign(self.similarity(g, perms, known), g, self.solver)
            known.add(g)
            remaining.remove(g)
        return perms


def _block_products(n: int, axis: int, blocks: list[tuple[int, int]], a: Tensor, b: Tensor) -> Tensor:
    """``sum`` over the group's blocks on ``axis`` of ``B_blk @ A_blk^T``, each block laid out ``[n, -1]``
    (a flattened block keeps each unit's ``k`` entries in its row)."""
    out: Tensor | None = None
    for start, stop in blocks:
        a_blk = a.narrow(axis, start, stop - start).movedim(axis, 0).reshape(n, -1)
        b_blk = b.narrow(axis, start, stop - start).movedim(axis, 0).reshape(n, -1)
        out = b_blk @ a_blk.T if out is None else out.add_(b_blk @ a_blk.T)
    assert out is not None  # every term has at least one block of its group
    return out


class L2Gradient:
    """The gradient of :class:`~rebasin_callbacks.costs.L2Cost` with respect to every group's permutation
    matrix, at hard permutations, in closed form: what a straight-through step needs, without applying
    any matrix to the weights.

    Where group ``g``'s matrix ``M`` multiplies the rows ``X`` of a model entry (its other axes permuted)
    and ``Y`` are the reference's, ``d/dM ||M X - Y||^2 = 2 (M X X^T - Y X^T)``. ``X X^T`` does not depend
    on the other permutations (they only relabel what is summed over), so it is computed once; ``Y X^T`` is
    weight matching's similarity over the parameters, cached and updated as in the descent. A step then
    costs the terms whose neighbours moved, instead of two products of every weight with its matrices.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import identity_permutations, trace_spec
        >>> from rebasin_callbacks.matching import L2Gradient
        >>> a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> spec = trace_spec(a, torch.randn(2, 3))
        >>> {g: tuple(G.shape) for g, G in L2Gradient(a, b, spec)(identity_permutations(spec)).items()}
        {'P_0': (4, 4)}
    """

    def __init__(
        self,
        model: nn.Module,
        reference: nn.Module,
        spec: PermutationSpec,
        problem: MatchingProblem | None = None,
    ):
        names = {n for n, _ in model.named_parameters()}
        sa, sb = model.state_dict(), reference.state_dict()
        # L2Cost divides by the size of every floating-point parameter, permuted or not.
        self.count = sum(v.numel() for k, v in sa.items() if k in names and v.is_floating_point())
        a = {
            k: v.detach() if v.dtype == torch.float64 else v.detach().float()
            for k, v in sa.items()
            if k in names and k in spec.axes_to_perm and v.is_floating_point()
        }
        b = {k: sb[k].detach().to(device=v.device, dtype=v.dtype) for k, v in a.items()}
        # The weight-matching problem of the same models (align's warm start) holds these terms already,
        # computed at the permutations the refinement starts from: share its cache when given.
        self.keys = set(a)
        if problem is None or not all(k in problem.a and problem.a[k].dtype == v.dtype for k, v in a.items()):
            problem = MatchingProblem(spec, a, b)
        self.problem = problem
        self.a = a
        self.gram: dict[str, Tensor] = {}
        # Block groups (heads) get no gradient here: align's refinement uses autograd when a spec has any.
        # A group inside moved blocks has a Gram matrix that depends on which block sits where: recomputed.
        self.moving: set[str] = set()
        for g, terms in self.problem.terms.items():
            if g in self.problem.block_groups:
                continue
            for key, axis, blocks in terms:
                if key not in self.keys:
                    continue
                if self.problem.block_groups_on(key, axis):
                    self.moving.add(g)
                term = _block_products(spec.sizes[g], axis, blocks, a[key], a[key])
                self.gram[g] = term if g not in self.gram else self.gram[g] + term

    def _gram(self, g: str, perms: Mapping[str, Tensor]) -> Tensor:
        if g not in self.moving:
            return self.gram[g]
        out: Tensor | None = None
        for key, axis, blocks in self.problem.terms[g]:
            if key not in self.keys:
                continue
            idx = axis_index(self.problem.spec, key, axis, perms, self.a[key].device, level="blocks")
            x = self.a[key] if idx is None else self.a[key].index_select(axis, idx)
            term = _block_products(self.problem.spec.sizes[g], axis, blocks, x, x)
            out = term if out is None else out + term
        assert out is not None
        return out

    def __call__(self, perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{group: dL2Cost/dM}`` at the hard permutations ``perms`` (groups no parameter touches, and
        block groups, are left out)."""
        out = {}
        for g in self.gram:
            gram = self._gram(g, perms)
            S = self.problem.similarity(g, perms, keys=self.keys)
            out[g] = (gram[perms[g].to(gram.device)] - S) * (2.0 / self.count)
        return out


def weight_matching(
    model: nn.Module | Mapping[str, Tensor],
    reference: nn.Module | Mapping[str, Tensor],
    spec: PermutationSpec | None = None,
    example_inputs: Any = None,
    *,
    n_iters: int = 100,
    init: Mapping[str, Tensor] | None = None,
    seed: int | None = None,
    assignment_solver: Literal["auto", "scipy", "auction"] = "auto",
) -> dict[str, Tensor]:
    """Permutations of ``model``'s hidden units that best match ``reference``'s weights (Git Re-Basin).

    Args:
        model: the model to permute (a module or a state dict; not modified).
        reference: the model to match (same architecture).
        spec: the permutation spec; traced from ``example_inputs`` when omitted.
        example_inputs: inputs for :func:`~rebasin_callbacks.trace_spec` when ``spec`` is omitted.
        n_iters: most coordinate-descent sweeps over all groups.
        init: ``{group: LongTensor}`` to start from; by default a greedy first sweep (see module docs).
        seed: seeds the random order in which groups are visited.
        assignment_solver: ``"scipy"`` (exact, on the CPU), ``"auction"`` (:func:`auction_assignment`,
            on the model's device) or ``"auto"``: the auction for groups of 2048 and more on a CUDA
            device, scipy otherwise. Either way a similarity whose row maxima are distinct needs no solver.

    Returns:
        ``{group: LongTensor}`` (on the CPU), for :func:`~rebasin_callbacks.permute`.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import PermutationSpec, permute, random_permutations, weight_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> spec = PermutationSpec.from_axes(
        ...     {"0.weight": ("P0", None), "0.bias": ("P0",), "2.weight": (None, "P0"), "2.bias": (None,)},
        ...     mlp.state_dict(),
        ... )
        >>> planted = permute(mlp, spec, random_permutations(spec))
        >>> perms = weight_matching(planted, mlp, spec)
        >>> bool(torch.equal(permute(planted, spec, perms)[0].weight, mlp[0].weight))
        True
    """
    if not (isinstance(n_iters, int) and n_iters >= 0):
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    if assignment_solver not in ("auto", "scipy", "auction"):
        raise ValueError(f"assignment_solver must be 'auto', 'scipy' or 'auction', got {assignment_solver!r}")
    check_compatible(model, reference)
    check_finite(model, "model")
    check_finite(reference, "reference")
    if isinstance(model, nn.Module):
        spec = resolve_spec(model, spec, example_inputs)
    elif spec is None:
        raise ValueError("with a state dict instead of a module, pass spec=... (tracing needs the module)")
    else:
        spec = spec.with_sizes(model)
    sa = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    sb = reference.state_dict() if isinstance(reference, nn.Module) else dict(reference)
    return MatchingProblem.from_states(spec, sa, sb, assignment_solver).descend(
        n_iters=n_iters, init=init, seed=seed
    )


def auction_assignment(
    scores: Tensor, *, rel_eps: float = 1e-9, max_rounds: int | None = None
) -> Tensor | None:
    """The permutation maximising ``sum_i scores[i, perm[i]]`` by Bertsekas' auction, on the scores' device.

    Jacobi auction with epsilon scaling, in float64: every unassigned row bids for its best column at
    once (matrix-wide tensor operations, no Python loop over rows), so it runs where the scores are (a
    GPU: no transfer to the CPU, no CPU solver). The answer is optimal to within ``n * eps`` of the best
    total, ``eps = rel_eps * (max - min of the scores)``: exact unless two assignments differ by less.

    Returns:
        a LongTensor on the scores' device, or ``None`` when a phase exceeded ``max_rounds`` bidding rounds
        (default ``50 n``; a price war): the caller falls back to an exact solver.

    Example:
        >>> import torch
        >>> from rebasin_callbacks.matching import auction_assignment
        >>> auction_assignment(torch.tensor([[1.0, 5.0, 0.0], [4.0, 5.0, 0.0], [0.0, 0.0, 2.0]])).tolist()
        [1, 0, 2]
    """
    n = scores.shape[-1]
    device = scores.device
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    S = scores.detach().to(torch.float64)
    lo, hi = torch.aminmax(S)
    spread = float(hi - lo)
    if spread == 0.0:
        return torch.arange(n, device=device)
    eps, eps_final = spread / 5.0, spread * rel_eps
    cap = 50 * n if max_rounds is None else max_rounds
    prices = torch.zeros(n, dtype=torch.float64, device=device)
    rows = torch.arange(n, device=device)
    while True:
        assign = torch.full((n,), -1, dtype=torch.long, device=device)  # row -> column
        owner = torch.full((n,), -1, dtype=torch.long, device=device)  # column -> row
        for _ in range(cap):
            bidders = rows[assign < 0]
            if bidders.numel() == 0:  # the round's one read-back
                break
            top, col = (S.index_select(0, bidders) - prices).topk(2, dim=1)
            target = col[:, 0]
            # Bid up to where the second-best column becomes as good, plus eps (always progresses).
            bid = prices[target] + (top[:, 0] - top[:, 1]) + eps
            best = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
            best.scatter_reduce_(0, target, bid, "amax")
            # Among equal highest bids for a column, the highest row index wins (deterministic).
            candidate = torch.where(bid >= best[target], bidders, -1)
            winner = torch.full((n,), -1, dtype=torch.long, device=device)
            winner.scatter_reduce_(0, target, candidate, "amax")
            won = (winner >= 0).nonzero().squeeze(1)
            new_rows = winner[won]
            old_rows = owner[won]
            assign[old_rows[old_rows >= 0]] = -1
            assign[new_rows] = won
            owner[won] = new_rows
            prices[won] = best[won]
        else:
            return None
        if eps <= eps_final:
            return assign
        eps = max(eps / 5.0, eps_final)


#: from this size on, similarities on a CUDA device are assigned by the on-device auction. It needs about
#: 3.5 n bidding rounds on unstructured scores (each a few kernels and one read-back), while scipy takes
#: ~0.05 s at n = 512 and ~3 s at n = 4096 on a server CPU: the auction can only win at the large sizes.
_AUCTION_MIN_N = 2048


def _assign(scores: Tensor, group: str, solver: str = "auto") -> Tensor:
    """:func:`~rebasin_callbacks.rebasin.assignment` of a similarity matrix on any device (a CPU
    LongTensor): the row-maximum shortcut runs where the scores are, the solver (when needed) on the CPU
    in float64."""
    best = scores.argmax(-1)
    unique = (torch.bincount(best, minlength=scores.shape[-1]) == 1).all()
    unique_h, finite_h = torch.stack([unique, torch.isfinite(scores).all()]).tolist()
    if not finite_h:
        raise ValueError(
            f"weight matching: the similarity of group {group!r} (n={scores.shape[-1]}) overflows to NaN/inf "
            f"in {scores.dtype}: the weights are too large (rescale them, or match in float64)"
        )
    if unique_h:
        return best.cpu()
    if solver == "auction" or (
        solver == "auto" and scores.device.type == "cuda" and scores.shape[-1] >= _AUCTION_MIN_N
    ):
        perm = auction_assignment(scores)
        if perm is not None:
            return perm.cpu()
    return assignment(scores.to(torch.float64))
