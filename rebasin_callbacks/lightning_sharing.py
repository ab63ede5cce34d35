"""One alignment per training step, shared by the callbacks of a Trainer.

Each callback keeps the alignments it computed or applied at the current step (:class:`Alignment`
records, in a :class:`StepAlignments` held as ``_alignments``); :func:`step_records` collects them from every callback of the Trainer,
and :func:`find` picks one another callback can reuse (same weights, reference, spec, cost and settings),
so that ``ReBasinAlign`` and ``LMCMonitor`` together compute one alignment per step, not two.

Example:
    >>> import lightning.pytorch as pl
    >>> step_records(pl.Trainer(accelerator="cpu", logger=False), None, 0)  # no callback aligned anything
    []
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rebasin_callbacks.lightning_guards import trainer_callbacks
from rebasin_callbacks.permute import invert_permutation
from rebasin_callbacks.spec import PermutationSpec

__all__ = ["Alignment", "StepAlignments", "step_records", "find", "same_reference", "inverse"]

_order = itertools.count()


@dataclass
class Alignment:
    """One alignment computed by a callback at a training step, kept so the other callbacks reuse it."""

    target: weakref.ref[nn.Module]  # the aligned module (weak: a record never keeps a model alive)
    step: int  # trainer.global_step when it was computed
    version: int  # how many in-place alignments of this step the aligned weights had already received
    reference: nn.Module
    spec: PermutationSpec
    cost: Any
    kwargs: dict
    perms: dict[str, Tensor]
    before: float
    after: float
    applied: bool  # applied in place to the trained module
    owner: str
    order: int = field(init=False, default_factory=lambda: next(_order))  # creation order


class StepAlignments:
    """A callback's alignments of the current training step, where :func:`step_records` finds them."""

    def __init__(self) -> None:
        self.entries: list[Alignment] = []

    def add(self, record: Alignment) -> None:
        self.entries.append(record)


def step_records(trainer: pl.Trainer, target: nn.Module, step: int) -> list[Alignment]:
    """This step's alignments of ``target`` by every callback of the Trainer, oldest first (each callback
    keeps its own; older steps are dropped as stale)."""
    found: list[Alignment] = []
    for callback in trainer_callbacks(trainer):
        kept = getattr(callback, "_alignments", None)
        if isinstance(kept, StepAlignments):
            kept.entries = [r for r in kept.entries if r.step == step]
            found += [r for r in kept.entries if r.target() is target]
    return sorted(found, key=lambda r: r.order)


def same_reference(a: nn.Module, b: nn.Module) -> bool:
    """Whether two reference modules hold the same weights (the same keys, shapes and values)."""
    if a is b:
        return True
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(
        v.shape == sb[k].shape and torch.equal(v, sb[k].to(device=v.device, dtype=v.dtype))
        for k, v in sa.items()
    )


def find(
    candidates: list[Alignment],
    version: int,
    reference: nn.Module,
    spec: PermutationSpec,
    cost: Any,
    kwargs: dict,
) -> Alignment | None:
    """A not-applied alignment of the same weights, reference, spec, cost and settings."""
    for r in candidates:
        if (
            not r.applied
            and r.version == version
            and r.cost == cost
            and r.kwargs == kwargs
            and r.spec.axes_to_perm == spec.axes_to_perm
            and same_reference(r.reference, reference)
        ):
            return r
    return None


def inverse(perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The permutations that undo ``perms`` (group by group)."""
    return {g: invert_permutation(p) for g, p in perms.items()}
