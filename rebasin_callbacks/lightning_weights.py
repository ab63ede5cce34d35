"""Everything in a Lightning Trainer that holds the aligned weights, and their permutation.

:func:`target_module` is the module the callbacks align (inside a ``torch.compile`` wrapper);
:func:`permute_training_state` permutes it, all or nothing, together with its pending gradients, every
optimizer's state, the averaged copies of weight-averaging callbacks and the ``AveragedModel`` copies the
LightningModule keeps itself.

Example:
    >>> from torch import nn
    >>> holder = nn.Module()
    >>> holder.model = nn.Linear(2, 3)
    >>> target_module(holder, "model") is holder.model
    True
"""

from __future__ import annotations

from typing import cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from rebasin_callbacks.lightning_guards import averaged_modules, weight_copies
from rebasin_callbacks.permute import permute, permute_state_dict
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError

__all__ = ["wrapped_target", "target_module", "own_averages", "permute_training_state"]


def wrapped_target(pl_module: nn.Module, submodule: str | None) -> nn.Module:
    """The submodule as the LightningModule holds it (maybe a ``torch.compile`` wrapper)."""
    if submodule is None:
        return pl_module
    try:
        return pl_module.get_submodule(submodule)
    except AttributeError:
        names = [n for n, _ in pl_module.named_children()]
        raise AttributeError(
            f"submodule={submodule!r}: {type(pl_module).__name__} has no such submodule (children: {names})"
        ) from None


def target_module(pl_module: nn.Module, submodule: str | None) -> nn.Module:
    """The module that is aligned: the submodule, inside ``torch.compile``'s ``OptimizedModule`` (whose
    weights are the wrapped module's), as :func:`~rebasin_callbacks.align` unwraps it; the same module at
    every epoch, so the spec and the reference keep their keys."""
    module = wrapped_target(pl_module, submodule)
    while isinstance(inner := getattr(module, "_orig_mod", None), nn.Module):
        module = inner
    return module


class _OptimizerStates:
    """Every optimizer's per-parameter state as one ``state`` mapping, so that :func:`permute` checks all of
    them before it changes anything (all-or-nothing across optimizers)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.state = {p: s for opt in optimizers for p, s in opt.state.items()}


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def own_averages(
    pl_module: nn.Module, target: nn.Module, submodule: str | None
) -> list[tuple[str, nn.Module]]:
    """The ``AveragedModel`` copies of ``target`` the LightningModule keeps itself (same keys and shapes).
    One that averages a part of ``target`` in another layout is refused: it would average two bases."""
    found = []
    shapes = _shapes(target)
    for name, held in averaged_modules(pl_module):
        inner = target_module(held, None)
        if inner is not target and _shapes(inner) == shapes:
            found.append((f"{type(pl_module).__name__}.{name}", inner))
        elif submodule is None or name == submodule or name.startswith(submodule + "."):
            raise MisconfigurationException(
                f"ReBasinAlign(submodule={submodule!r}): {type(pl_module).__name__}.{name} is an AveragedModel "
                "inside the aligned module whose copy is not of the aligned module, so it cannot be permuted "
                "with it; align the module it averages (submodule=...) or use mode='copy'"
            )
    return found


def permute_training_state(
    trainer: pl.Trainer,
    pl_module: nn.Module,
    target: nn.Module,
    spec: PermutationSpec,
    perms: dict[str, Tensor],
    submodule: str | None,
) -> None:
    """Permute, all or nothing, everything in the Trainer that holds the aligned weights: the module's
    parameters and buffers, their pending gradients (gradient accumulation), every optimizer's state, and
    the averaged copies kept by weight-averaging callbacks. Every new value is computed (and every entry
    checked) before anything is written."""
    state = target.state_dict(keep_vars=True)
    grads = {k: v.grad for k, v in state.items() if isinstance(v, nn.Parameter) and v.grad is not None}
    new_grads: dict[str, Tensor] = {}
    if grads:
        source = {**{k: v.detach() for k, v in state.items()}, **grads}
        permuted = permute_state_dict(source, spec, perms)
        new_grads = {k: permuted[k] for k in grads if k in spec.axes_to_perm}
    copies = []
    held_copies = weight_copies(trainer, submodule, target_module) + own_averages(
        pl_module, target, submodule
    )
    for name, held in held_copies:
        held_state = held.state_dict(keep_vars=True)
        if _shapes(held) != _shapes(target):
            raise SpecMismatchError(
                f"ReBasinAlign: {name}'s copy of the weights does not have the model's keys and shapes; "
                "nothing was changed"
            )
        new = permute_state_dict({k: v.detach() for k, v in held_state.items()}, spec, perms)
        copies.append((held_state, new))
    optimizers = cast(torch.optim.Optimizer, _OptimizerStates(list(trainer.optimizers)))
    permute(target, spec, perms, optimizer=optimizers, inplace=True)  # checks, then writes
    with torch.no_grad():
        for key, value in new_grads.items():
            grads[key].copy_(value)
        for held_state, new in copies:
            for key in spec.axes_to_perm:
                held_state[key].copy_(new[key])
