"""Channel spaces for the tracer: which tensor dimensions must be permuted alike (a union-find).

Every dimension of every value in a traced graph gets a label: a space id (an ``int``), a concatenation of
spaces (:class:`Blocks`, from ``torch.cat`` or fused weights), a space flattened with ``k`` entries per
channel (:class:`Repeat`, a conv's ``(C, H, W)`` flattened into a Linear), or ``None`` (fixed: not a channel,
or a channel no permutation may move). :class:`Spaces` merges the labels two dimensions must share and fixes
those an operation does not allow to move. :mod:`rebasin_callbacks.trace` walks the graph with it; nothing
here knows about graphs or modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Blocks", "Repeat", "DimLabel", "Spaces"]


@dataclass(frozen=True)
class Blocks:
    """A dimension that is the concatenation of blocks ``(space or None, size)`` (from ``torch.cat``)."""

    parts: tuple[tuple[int | None, int], ...]

    @property
    def size(self) -> int:
        return sum(n for _, n in self.parts)


@dataclass(frozen=True)
class Repeat:
    """A dimension that is a channel space flattened with ``k`` fixed entries per channel (``(C, H, W)`` ->
    ``C * H * W``: channel ``i`` owns entries ``[i * k, (i + 1) * k)``), as a conv feeding a Linear."""

    space: int
    k: int


# a space id, a concatenation of spaces, a flattened space, or None (fixed / not a channel)
DimLabel = int | Blocks | Repeat | None


class Spaces:
    """Union-find over channel spaces. The root of a class is its earliest space (it gives the name)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []
        self.fixed: list[bool] = []
        # root -> the concatenation (or flattened space) this space was found to be
        self.blocks: dict[int, Blocks | Repeat] = {}

    def new(self, size: int, name: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.name.append(name)
        self.fixed.append(size <= 1)  # a single channel has nothing to permute
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def resolve(self, label: DimLabel) -> DimLabel:
        """Canonical form: fixed spaces become None, refined spaces become their blocks."""
        if label is None:
            return None
        if isinstance(label, int):
            r = self.find(label)
            if self.fixed[r]:
                return None
            if r in self.blocks:
                return self.resolve(self.blocks[r])
            return r
        if isinstance(label, Repeat):
            sub = self.resolve(label.space)
            # a flattened space later found to be a concatenation is not followed (verification drops it)
            return Repeat(sub, label.k) if isinstance(sub, int) else None
        parts: list[tuple[int | None, int]] = []
        for space, n in label.parts:
            sub = self.resolve(space)
            if isinstance(sub, Blocks):
                parts.extend(sub.parts)
            elif isinstance(sub, Repeat):
                parts.append((None, n))  # not followed inside a concatenation
            else:
                parts.append((sub, n))
        if all(s is None for s, _ in parts):
            return None
        return Blocks(tuple(parts))

    def fix(self, label: Any) -> None:
        """Fix every space inside ``label`` (a dim label, or nested lists / tuples / dicts of them)."""
        if label is None:
            return
        if isinstance(label, int):
            r = self.find(label)
            self.fixed[r] = True
            if r in self.blocks:
                self.fix(self.blocks[r])
        elif isinstance(label, Blocks):
            for space, _ in label.parts:
                self.fix(space)
        elif isinstance(label, Repeat):
            self.fix(label.space)
        elif isinstance(label, Mapping):
            for v in label.values():
                self.fix(v)
        elif isinstance(label, (list, tuple)):
            for v in label:
                self.fix(v)

    def label_size(self, label: DimLabel) -> int | None:
        if isinstance(label, int):
            return self.size[label]
        if isinstance(label, Blocks):
            return label.size
        if isinstance(label, Repeat):
            return self.size[label.space] * label.k
        return None

    def merge(self, a: DimLabel, b: DimLabel) -> DimLabel:
        """Two dimensions that must be permuted alike; returns the merged label."""
        a, b = self.resolve(a), self.resolve(b)
        if a is None or b is None:
            self.fix(a)
            self.fix(b)
            return None
        if isinstance(a, int) and isinstance(b, int):
            if a == b:
                return a
            if self.size[a] != self.size[b]:
                self.fix(a)
                self.fix(b)
                return None
            lo, hi = min(a, b), max(a, b)
            self.parent[hi] = lo
            return lo
        if isinstance(a, Repeat) or isinstance(b, Repeat):
            if isinstance(a, Repeat) and isinstance(b, Repeat) and a.k == b.k:
                m = self.merge(a.space, b.space)
                return Repeat(m, a.k) if isinstance(m, int) else None
            if isinstance(b, Repeat) and isinstance(a, int):
                a, b = b, a
            if (
                isinstance(a, Repeat)
                and isinstance(b, int)
                and b != a.space
                and self.size[b] == self.size[a.space] * a.k
            ):
                self.blocks[b] = a  # a free space found to be a flattened one (a Linear's input axis)
                return a
            self.fix(a)
            self.fix(b)
            return None
        if isinstance(a, Blocks) and isinstance(b, int):
            a, b = b, a
        if isinstance(a, int) and isinstance(b, Blocks):
            # a free space equal to a concatenation: refine it (a block-diagonal permutation is still valid).
            if self.size[a] != b.size or any(s == a for s, _ in b.parts):
                self.fix(a)
                self.fix(b)
                return None
            self.blocks[a] = b
            return b
        assert isinstance(a, Blocks) and isinstance(b, Blocks)
        if [n for _, n in a.parts] != [n for _, n in b.parts]:
            self.fix(a)
            self.fix(b)
            return None
        merged = tuple((self.merge(sa, sb), n) for (sa, n), (sb, _) in zip(a.parts, b.parts))
        return self.resolve(
            Blocks(tuple((s if isinstance(s, int) or s is None else None, n) for s, n in merged))
        )
