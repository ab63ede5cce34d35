"""Permutation specs in the format Git Re-Basin made standard.

A :class:`PermutationSpec` says which axes of which state_dict entries are permuted together:

* ``axes_to_perm[key]`` has one entry per axis of ``state_dict[key]``: the name of the permutation group
  acting on that axis, or ``None``;
* ``perm_to_axes[group]`` lists the ``(key, axis)`` pairs the group acts on;
* ``sizes[group]`` is the group's size (the length of every axis it acts on).

Both dicts are kept consistent by construction (:meth:`PermutationSpec.from_axes`). Specs are plain data:
write them by hand, derive them with :func:`~rebasin_callbacks.trace_spec`, save them as JSON.

One extension to Git Re-Basin's format: an axis entry may be a tuple of blocks, each a group name, an int
(the length of a block that no permutation touches) or a pair ``(group, k)``: the group's units flattened
with ``k`` consecutive entries each (unit ``i`` owns entries ``[i * k, (i + 1) * k)``). The axis is then the
concatenation of those blocks and each group permutes inside its own block(s). This expresses ``torch.cat``
outputs, fused attention weights (``qkv``: the query, key and value blocks of every head, where a head's
query and key blocks share a group) and a conv's ``(C, H, W)`` output flattened into a Linear
(``(None, (("P", H * W),))`` on the Linear's weight).

Block groups (``block_axes``) permute whole blocks of an axis, such as the heads of an attention layer: the
same entry format, e.g. ``(("H", head_dim),) * 3`` on a fused ``qkv`` weight's output axis moves the query,
key and value blocks of every head together. They act first; the groups of ``axes_to_perm`` then permute
inside the blocks *at their new positions* (group ``qk0`` permutes inside whichever head ends up first).
Each level alone keeps the function, so their composition does too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["PermutationSpec", "SpecMismatchError", "AxisEntry", "Block"]

#: One block of a block axis: a group name, an int (a fixed block of that length), or ``(group, k)`` (the
#: group's units flattened with ``k`` entries each).
Block = str | int | tuple[str, int]
#: One axis of one state_dict entry: ``None`` (not permuted), a group name, or a tuple of blocks
#: concatenated along the axis.
AxisEntry = str | None | tuple[Block, ...]


class SpecMismatchError(ValueError):
    """A spec, a model or a reference do not fit together (names the first offending key and shapes)."""


@dataclass
class PermutationSpec:
    """Which state_dict axes each permutation group acts on.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import PermutationSpec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> spec = PermutationSpec.from_axes(
        ...     {"0.weight": ("P0", None), "0.bias": ("P0",), "2.weight": (None, "P0"), "2.bias": (None,)},
        ...     mlp.state_dict(),
        ... )
        >>> spec.sizes
        {'P0': 4}
    """

    perm_to_axes: dict[str, list[tuple[str, int]]]
    axes_to_perm: dict[str, tuple[AxisEntry, ...]]
    sizes: dict[str, int] = field(default_factory=dict)
    #: Groups that move whole blocks of an axis (attention heads), applied before ``axes_to_perm``'s groups;
    #: same entry format, keys a subset of ``axes_to_perm``'s. Their ``(key, axis)`` pairs are in
    #: ``perm_to_axes`` and their sizes in ``sizes`` like any group's.
    block_axes: dict[str, tuple[AxisEntry, ...]] = field(default_factory=dict)
    #: The relative output error :func:`~rebasin_callbacks.check_spec` achieved when ``trace_spec`` verified
    #: this spec (float64, all groups permuted at once); ``None`` when it was not verified.
    check_error: float | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_axes(
        cls,
        axes_to_perm: Mapping[str, tuple[AxisEntry, ...] | list],
        shapes: Mapping[str, Tensor | torch.Size | tuple[int, ...]] | None = None,
        sizes: Mapping[str, int] | None = None,
        block_axes: Mapping[str, tuple[AxisEntry, ...] | list] | None = None,
    ) -> PermutationSpec:
        """Build a spec from ``axes_to_perm`` (and the block groups ``block_axes``, see the module docs).

        With ``shapes`` (a state_dict, or key -> shape) the group sizes are inferred and every axis is
        checked against them. ``sizes`` gives sizes that cannot be inferred (e.g. of groups that only
        appear inside blocks alongside other unknown groups).
        """
        a2p = {k: tuple(_as_entry(e) for e in v) for k, v in axes_to_perm.items()}
        b2p = {k: tuple(_as_entry(e) for e in v) for k, v in (block_axes or {}).items()}
        b2p = {k: v for k, v in b2p.items() if any(_entry_groups(e) for e in v)}
        for key, axes in b2p.items():
            if key not in a2p:
                a2p[key] = (None,) * len(axes)
            if len(a2p[key]) != len(axes):
                raise SpecMismatchError(
                    f"{key!r}: block_axes gives {len(axes)} axes but axes_to_perm gives {len(a2p[key])}"
                )
        p2a: dict[str, list[tuple[str, int]]] = {}
        levels: dict[str, str] = {}
        for level, mapping in (("axes_to_perm", a2p), ("block_axes", b2p)):
            for key, axes in mapping.items():
                for axis, entry in enumerate(axes):
                    for group in dict.fromkeys(_entry_groups(entry)):
                        if levels.setdefault(group, level) != level:
                            raise SpecMismatchError(
                                f"group {group!r} is in both axes_to_perm and block_axes ({key!r}, axis {axis})"
                            )
                        p2a.setdefault(group, []).append((key, axis))
        spec = cls(perm_to_axes=p2a, axes_to_perm=a2p, sizes=dict(sizes or {}), block_axes=b2p)
        if shapes is not None:
            spec.sizes = spec._infer_sizes(shapes)
        return spec

    def _infer_sizes(self, shapes: Mapping[str, Tensor | torch.Size | tuple[int, ...]]) -> dict[str, int]:
        sizes: dict[str, int] = {g: n for g, n in self.sizes.items() if g in self.perm_to_axes}
        first: dict[str, str] = {g: "the spec's sizes" for g in sizes}

        def settle(group: str, size: int, where: str) -> None:
            if group not in sizes:
                sizes[group], first[group] = size, where
            elif sizes[group] != size:
                raise SpecMismatchError(
                    f"group {group!r}: {where} has size {size} but {first[group]} has size {sizes[group]}"
                )

        block_axes: list[tuple[str, int, tuple[Block, ...], int]] = []
        for key, axes in [*self.axes_to_perm.items(), *self.block_axes.items()]:
            if key not in shapes:
                raise SpecMismatchError(f"spec names {key!r} but the model has no such entry")
            shape = _shape(shapes[key])
            if len(shape) != len(axes):
                raise SpecMismatchError(
                    f"{key!r} has shape {shape} ({len(shape)} axes) but the spec gives {len(axes)} axes: {axes}"
                )
            for axis, entry in enumerate(axes):
                if isinstance(entry, str):
                    settle(entry, shape[axis], f"axis {axis} of {key!r}")
                elif isinstance(entry, tuple):
                    block_axes.append((key, axis, entry, shape[axis]))
        # A group known only from blocks gets its size from an axis where it is the one unknown.
        changed = True
        while changed:
            changed = False
            for key, axis, entry, length in block_axes:
                unknown = [_block_group(b) for b in entry if _block_group(b) not in (None, *sizes)]
                if unknown and len(set(unknown)) == 1:
                    known = sum(_block_length(b, sizes) for b in entry if _block_group(b) not in unknown)
                    per_unit = sum(_block_repeat(b) for b in entry if _block_group(b) in unknown)
                    size, rem = divmod(length - known, per_unit)
                    if rem or size <= 0:
                        raise SpecMismatchError(
                            f"axis {axis} of {key!r} (length {length}) cannot hold the blocks {entry}"
                        )
                    settle(str(unknown[0]), size, f"a block of axis {axis} of {key!r}")
                    changed = True
        for key, axis, entry, length in block_axes:
            missing = [_block_group(b) for b in entry if _block_group(b) not in (None, *sizes)]
            if missing:
                raise SpecMismatchError(
                    f"cannot infer the sizes of groups {missing} in axis {axis} of {key!r}"
                )
            total = sum(_block_length(b, sizes) for b in entry)
            if total != length:
                raise SpecMismatchError(
                    f"axis {axis} of {key!r} has length {length} but its blocks {entry} add up to {total}"
                )
        return {g: sizes[g] for g in self.perm_to_axes}

    # ------------------------------------------------------------------ queries
    @property
    def groups(self) -> list[str]:
        """Group names, in a stable order."""
        return list(self.perm_to_axes)

    def __len__(self) -> int:
        return len(self.perm_to_axes)

    @property
    def block_groups(self) -> set[str]:
        """The groups that move whole blocks (attention heads), see ``block_axes``."""
        return {g for axes in self.block_axes.values() for e in axes for g in _entry_groups(e)}

    def axis_blocks(self, key: str, axis: int, *, level: str = "units") -> list[tuple[str | None, int, int]]:
        """``[(group or None, start, stop), ...]`` along ``axis`` of ``key``; ``[]`` when it is not permuted.

        A flattened block ``(group, k)`` spans ``sizes[group] * k`` entries (``k = (stop - start) // n``).
        ``level="blocks"`` reads the block groups (``block_axes``) instead of ``axes_to_perm``."""
        if level == "blocks":
            entry = self.block_axes[key][axis] if key in self.block_axes else None
        else:
            entry = self.axes_to_perm[key][axis]
        if entry is None:
            return []
        if isinstance(entry, str):
            return [(entry, 0, self.sizes[entry])]
        out: list[tuple[str | None, int, int]] = []
        start = 0
        for block in entry:
            length = _block_length(block, self.sizes)
            out.append((_block_group(block), start, start + length))
            start += length
        return out

    def validate(self, state_dict: Mapping[str, Tensor], *, name: str = "model") -> None:
        """Raise :class:`SpecMismatchError` if ``state_dict`` does not fit this spec (names the first
        offending key, axis and sizes)."""
        try:
            self._infer_sizes({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})
        except SpecMismatchError as err:
            raise SpecMismatchError(f"{name}: {err}") from None

    def with_sizes(self, state_dict: Mapping[str, Tensor], *, name: str = "model") -> PermutationSpec:
        """A new spec with every group's size read from ``state_dict`` (validated as :meth:`validate`
        does); this spec is left as it is.

        Example:
            >>> import torch
            >>> spec = PermutationSpec.from_axes({"w": ("P", None)})
            >>> spec.with_sizes({"w": torch.zeros(3, 2)}).sizes, spec.sizes
            ({'P': 3}, {})
        """
        try:
            sizes = self._infer_sizes({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})
        except SpecMismatchError as err:
            raise SpecMismatchError(f"{name}: {err}") from None
        return replace(
            self,
            perm_to_axes={g: list(pairs) for g, pairs in self.perm_to_axes.items()},
            axes_to_perm=dict(self.axes_to_perm),
            sizes=sizes,
        )

    def coverage(self, state_dict: Mapping[str, Tensor]) -> float:
        """Fraction of floating-point parameter elements that lie on at least one permuted axis."""
        total = covered = 0
        for key, value in state_dict.items():
            if not (isinstance(value, Tensor) and value.is_floating_point()):
                continue
            total += value.numel()
            entries = (*self.axes_to_perm.get(key, ()), *self.block_axes.get(key, ()))
            if any(_entry_groups(e) for e in entries):
                covered += value.numel()
        return covered / total if total else 0.0

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        out = {"axes_to_perm": _axes_dict(self.axes_to_perm), "sizes": dict(self.sizes)}
        if self.block_axes:
            out["block_axes"] = _axes_dict(self.block_axes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PermutationSpec:
        return cls.from_axes(
            {k: tuple(v) for k, v in data["axes_to_perm"].items()},
            sizes={k: int(v) for k, v in data.get("sizes", {}).items()},
            block_axes={k: tuple(v) for k, v in data.get("block_axes", {}).items()},
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to a JSON string (and write it to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from rebasin_callbacks.io import atomic_write_text

            atomic_write_text(path, text)  # a failed write leaves the previous file intact
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PermutationSpec:
        """Load a spec from a JSON string or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}({self.sizes.get(g, '?')})" for g in list(self.perm_to_axes)[:8])
        more = f", ... {len(self) - 8} more" if len(self) > 8 else ""
        return f"PermutationSpec({len(self)} groups: {groups}{more}; {len(self.axes_to_perm)} keys)"


def _axes_dict(axes: Mapping[str, tuple[AxisEntry, ...]]) -> dict[str, list]:
    return {
        k: [[list(b) if isinstance(b, tuple) else b for b in e] if isinstance(e, tuple) else e for e in v]
        for k, v in axes.items()
    }


def _entry_groups(entry: AxisEntry) -> list[str]:
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    return [g for g in map(_block_group, entry) if g is not None]


def _block_group(block: Block) -> str | None:
    if isinstance(block, str):
        return block
    return block[0] if isinstance(block, tuple) else None


def _block_repeat(block: Block) -> int:
    return block[1] if isinstance(block, tuple) else 1


def _block_length(block: Block, sizes: Mapping[str, int]) -> int:
    if isinstance(block, int):
        return block
    if isinstance(block, tuple):
        return sizes[block[0]] * block[1]
    return sizes[block]


def _as_block(block: object) -> Block:
    if isinstance(block, (str, int)) and not isinstance(block, bool):
        return block
    if (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and isinstance(block[0], str)
        and isinstance(block[1], int)
        and block[1] >= 1
    ):
        return (block[0], int(block[1]))
    raise TypeError(f"a block must be a group name, an int or a (group, k >= 1) pair, got {block!r}")


def _as_entry(entry: object) -> AxisEntry:
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, (list, tuple)):
        return tuple(_as_block(b) for b in entry)
    raise TypeError(f"an axis entry must be None, a group name or a tuple of blocks, got {entry!r}")


def _shape(value: Tensor | torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Tensor) else tuple(value)
