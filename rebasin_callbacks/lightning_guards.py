"""What the Lightning callbacks that change weights must know about the rest of the Trainer.

* Strategies that shard parameters (FSDP, DeepSpeed, model parallel) are refused at setup, as Lightning's
  own ``StochasticWeightAveraging`` refuses them: a rank holds slices of flattened parameters, and a
  permutation of hidden units needs whole weight matrices.
* Callbacks that keep their own copy of the weights and update it from the model (Lightning's
  ``WeightAveraging`` / ``EMAWeightAveraging`` and ``StochasticWeightAveraging``) are found, so that a
  permutation of the model is applied to their copy too; otherwise every later update would average two
  bases.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning.pytorch.callbacks import EMAWeightAveraging
    >>> trainer = pl.Trainer(accelerator="cpu", callbacks=[EMAWeightAveraging()], logger=False)
    >>> refuse_sharded(trainer, "ReBasinAlign")  # single device: nothing to refuse
    >>> weight_copies(trainer, None)  # the averaged copy exists once fitting has set it up
    []
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

__all__ = [
    "refuse_sharded",
    "weight_copies",
    "check_weight_holders",
    "trainer_callbacks",
    "weight_averagers",
    "averaged_modules",
]


def _sharded_strategies() -> tuple[type, ...]:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """The Trainer's callbacks (an attribute Lightning sets at construction)."""
    return list(getattr(trainer, "callbacks", []))


def refuse_sharded(trainer: pl.Trainer, who: str) -> None:
    """Raise ``MisconfigurationException`` naming ``who`` and the strategy when it shards parameters."""
    strategy = trainer.strategy
    if isinstance(strategy, _sharded_strategies()):
        raise MisconfigurationException(
            f"{who} does not support sharded models: {type(strategy).__name__} splits every parameter "
            "across processes, and a permutation needs whole weight matrices; use DDP or a single device"
        )


def weight_copies(
    trainer: pl.Trainer,
    submodule: str | None,
    select: Callable[[nn.Module, str | None], nn.Module] | None = None,
) -> list[tuple[str, nn.Module]]:
    """``(callback name, module)`` for every copy of the LightningModule's weights that a callback keeps
    and updates from it; ``select(copy, submodule)`` picks the part that is aligned (default:
    ``copy.get_submodule(submodule)``). A copy not made yet (before fitting starts) is left out."""
    copies = []
    for callback in trainer_callbacks(trainer):
        if isinstance(callback, WeightAveraging):
            averaged = callback._average_model
            held = averaged.module if averaged is not None else None
        elif isinstance(callback, StochasticWeightAveraging):
            held = callback._average_model
        else:
            continue
        if held is None:
            continue
        if select is not None:
            held = select(held, submodule)
        elif submodule is not None:
            held = held.get_submodule(submodule)
        copies.append((type(callback).__name__, held))
    return copies


def averaged_modules(pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, averaged copy)`` for every ``torch.optim.swa_utils.AveragedModel`` inside the LightningModule
    (an EMA or SWA copy the module keeps itself)."""
    from torch.optim.swa_utils import AveragedModel

    return [(name, m.module) for name, m in pl_module.named_modules() if isinstance(m, AveragedModel)]


def weight_averagers(trainer: pl.Trainer) -> list[str]:
    """The names of the Trainer's callbacks that keep an average of the weights."""
    averaging = (WeightAveraging, StochasticWeightAveraging)
    return [type(c).__name__ for c in trainer_callbacks(trainer) if isinstance(c, averaging)]


def check_weight_holders(trainer: pl.Trainer, who: str, instead: str) -> None:
    """Refuse, at setup, a weight-averaging callback whose copy cannot be found (another Lightning
    version): after a permutation of the model it would average two bases. ``instead`` names the way out."""
    for callback in trainer_callbacks(trainer):
        if isinstance(callback, (WeightAveraging, StochasticWeightAveraging)) and not hasattr(
            callback, "_average_model"
        ):
            name = type(callback).__name__
            raise MisconfigurationException(
                f"{who}: {name} keeps a copy of the weights that cannot be found to permute with the model; "
                f"it would average two bases after an alignment. Use {who}({instead}) or remove {name}"
            )
