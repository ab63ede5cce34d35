"""Permutation specs in the format Git Re-Basin made standard.

A :class:`PermutationSpec` says which axes of which state_dict entries are permuted together:

* ``axes_to_perm[key]`` has one entry per axis of ``state_dict[key]``: the name of the permutation group
  acting on that axis, or ``None``;
* ``perm_to_axes[group]`` lists the ``(key, axis)`` pairs the group acts on;
* ``sizes[group]`` is the group's size (the length of every axis it acts on).

Both dicts are kept consistent by construction (:meth:`PermutationSpec.from_axes`). Specs are plain data:
write them by hand, derive them with :func:`~rebasin_callbacks.trace_spec`, save them as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["PermutationSpec", "SpecMismatchError"]


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
    axes_to_perm: dict[str, tuple[str | None, ...]]
    sizes: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_axes(
        cls,
        axes_to_perm: Mapping[str, tuple[str | None, ...] | list[str | None]],
        shapes: Mapping[str, Tensor | torch.Size | tuple[int, ...]] | None = None,
    ) -> PermutationSpec:
        """Build a spec from ``axes_to_perm``; with ``shapes`` (a state_dict or key -> shape) the group
        sizes are filled in and every axis is checked to have its group's size."""
        a2p = {k: tuple(v) for k, v in axes_to_perm.items()}
        p2a: dict[str, list[tuple[str, int]]] = {}
        for key, axes in a2p.items():
            for axis, group in enumerate(axes):
                if group is not None:
                    p2a.setdefault(group, []).append((key, axis))
        spec = cls(perm_to_axes=p2a, axes_to_perm=a2p)
        if shapes is not None:
            spec.sizes = spec._infer_sizes(shapes)
        return spec

    def _infer_sizes(self, shapes: Mapping[str, Tensor | torch.Size | tuple[int, ...]]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        first: dict[str, tuple[str, int]] = {}
        for group, axes in self.perm_to_axes.items():
            for key, axis in axes:
                if key not in shapes:
                    raise SpecMismatchError(f"spec names {key!r} (group {group!r}) but the model has no such entry")
                shape = tuple(_shape(shapes[key]))
                if len(shape) != len(self.axes_to_perm[key]):
                    raise SpecMismatchError(
                        f"{key!r} has shape {shape} ({len(shape)} axes) but the spec gives "
                        f"{len(self.axes_to_perm[key])} axes: {self.axes_to_perm[key]}"
                    )
                if group not in sizes:
                    sizes[group], first[group] = shape[axis], (key, axis)
                elif shape[axis] != sizes[group]:
                    k0, a0 = first[group]
                    raise SpecMismatchError(
                        f"group {group!r}: axis {axis} of {key!r} has size {shape[axis]} but axis {a0} of "
                        f"{k0!r} has size {sizes[group]}"
                    )
        return sizes

    # ------------------------------------------------------------------ queries
    @property
    def groups(self) -> list[str]:
        """Group names, in a stable order."""
        return list(self.perm_to_axes)

    def __len__(self) -> int:
        return len(self.perm_to_axes)

    def validate(self, state_dict: Mapping[str, Tensor], *, name: str = "model") -> None:
        """Raise :class:`SpecMismatchError` if ``state_dict`` does not fit this spec."""
        sizes = self._infer_sizes({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})
        for group, size in self.sizes.items():
            if group in sizes and sizes[group] != size:
                key, axis = self.perm_to_axes[group][0]
                raise SpecMismatchError(
                    f"{name}: group {group!r} has size {size} in the spec but axis {axis} of {key!r} has "
                    f"size {sizes[group]}"
                )

    def coverage(self, state_dict: Mapping[str, Tensor]) -> float:
        """Fraction of floating-point parameter elements that lie on at least one permuted axis."""
        total = covered = 0
        for key, value in state_dict.items():
            if not (isinstance(value, Tensor) and value.is_floating_point()):
                continue
            total += value.numel()
            if any(g is not None for g in self.axes_to_perm.get(key, ())):
                covered += value.numel()
        return covered / total if total else 0.0

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "axes_to_perm": {k: list(v) for k, v in self.axes_to_perm.items()},
            "sizes": dict(self.sizes),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> PermutationSpec:
        spec = cls.from_axes({k: tuple(v) for k, v in data["axes_to_perm"].items()})
        spec.sizes = {k: int(v) for k, v in data.get("sizes", {}).items()}
        return spec

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to a JSON string (and write it to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PermutationSpec:
        """Load a spec from a JSON string or a path to a JSON file."""
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        groups = ", ".join(f"{g}({self.sizes.get(g, '?')})" for g in list(self.perm_to_axes)[:8])
        more = f", ... {len(self) - 8} more" if len(self) > 8 else ""
        return f"PermutationSpec({len(self)} groups: {groups}{more}; {len(self.axes_to_perm)} keys)"


def _shape(value: Tensor | torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Tensor) else tuple(value)
