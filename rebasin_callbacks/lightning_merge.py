"""Lightning callback: merge the model being trained with other models into one basin, as a second set of
weights kept beside training (like Lightning's ``WeightAveraging``).

:class:`ReBasinMerge` holds ``merged_model``: at the end of fit (and every ``every_n_epochs`` epochs when
asked) the LightningModule (or its ``submodule``) and the ``others`` (modules, state dicts or checkpoint
paths: other seeds, other sites, earlier runs) are aligned into one basin by
:func:`~rebasin_callbacks.merge` and averaged into it. Training is never changed: the model and its
optimizer are only read, unless ``write_back=True``, which copies the merged weights into the model once fit
has ended. The merged model's loss and accuracy, the ensemble's and the barrier are logged (``merge/*``) on
``data`` (default: the Trainer's validation data).

Example:
    >>> import lightning.pytorch as pl
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from rebasin_callbacks.lightning_merge import ReBasinMerge
    >>> def net():
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> class Lit(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = net()
    ...     def forward(self, x):
    ...         return self.model(x)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return torch.nn.functional.cross_entropy(self(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=32)
    >>> merging = ReBasinMerge([net(), net()], submodule="model", data=data, progress=False)
    >>> trainer = pl.Trainer(max_epochs=1, callbacks=[merging], logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Lit(), data)
    >>> sorted(merging.metrics)[:3], merging.merges
    (['merge/accuracy', 'merge/barrier', 'merge/ensemble_accuracy'], 1)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from rebasin_callbacks.checkpoints import ReferenceLike, load_reference_state, match_reference
from rebasin_callbacks.merge import METHODS, MergeResult, merge
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.utils import check_finite, module_device, split_batch, to_device

__all__ = ["ReBasinMerge"]


class ReBasinMerge(pl.Callback):
    """Merge the trained model with ``others`` into ``merged_model`` at fit end / every n epochs.

    Args:
        others: the models to merge with (at least one): modules, state dicts or checkpoint paths (read with
            ``weights_only=True``, matched strictly to the model's keys and shapes at ``setup``).
        method: a :func:`~rebasin_callbacks.merge` method (default ``"data_free"``; ``"data"`` learns on
            ``data``).
        weights: merge weights, the trained model's first (default equal).
        every_n_epochs: also merge after every n-th training epoch (``None``: only at fit end).
        data: ``(inputs, targets)`` batches for the evaluation (and for ``method="data"``, ``reset_bn``,
            ``repair``); default the Trainer's validation data.
        loss_fn: the evaluation's and ``method="data"``'s loss (default cross-entropy).
        reset_bn / repair: fix the merged model's BatchNorm statistics on ``data``.
        write_back: after fit, copy the merged weights into the model (the only change to training).
        submodule: the LightningModule's submodule to merge (e.g. ``"model"``; ``None`` = the module).
        spec / example_inputs: the permutation spec, or inputs to trace it (default: the first batch of
            ``data`` or of the training data).
        max_batches: evaluation batches (``None``: all).
        merge_kwargs: more :func:`~rebasin_callbacks.merge` keywords (``steps``, ``seed``, ...).

    Attributes:
        merged_model: the latest merged model (``None`` before the first merge).
        result: the latest :class:`~rebasin_callbacks.MergeResult`.
        metrics: the latest logged metrics; ``merges``: how many merges ran.
    """

    def __init__(
        self,
        others: Sequence[ReferenceLike],
        *,
        method: str = "data_free",
        weights: Sequence[float] | None = None,
        every_n_epochs: int | None = None,
        data: Iterable[Any] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        reset_bn: bool = False,
        repair: bool = False,
        write_back: bool = False,
        submodule: str | None = None,
        spec: PermutationSpec | None = None,
        example_inputs: Any = None,
        max_batches: int | None = None,
        progress: bool = False,
        merge_kwargs: dict[str, Any] | None = None,
    ):
        if isinstance(others, (str, nn.Module)) or not isinstance(others, Sequence) or not others:
            raise ValueError("ReBasinMerge: others must be a non-empty list of modules, state dicts or paths")
        if method not in METHODS:
            raise ValueError(f"ReBasinMerge: method must be one of {', '.join(METHODS)}, got {method!r}")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(
                f"ReBasinMerge: every_n_epochs must be an int >= 1 or None, got {every_n_epochs!r}"
            )
        if weights is not None and len(weights) != len(others) + 1:
            raise ValueError(
                f"ReBasinMerge: weights has {len(weights)} entries for {len(others) + 1} models "
                "(the trained model first)"
            )
        self.others_source = list(others)
        self.method, self.weights, self.every_n_epochs = method, weights, every_n_epochs
        self.data, self.loss_fn, self.reset_bn, self.repair = data, loss_fn, reset_bn, repair
        self.write_back, self.submodule, self.spec = write_back, submodule, spec
        self.example_inputs, self.max_batches, self.progress = example_inputs, max_batches, progress
        self.merge_kwargs = dict(merge_kwargs or {})
        self.others: list[nn.Module] = []
        self.merged_model: nn.Module | None = None
        self.result: MergeResult | None = None
        self.metrics: dict[str, float] = {}
        self.merges = 0
        self._warned = False
        self._restored: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------------------------------ hooks
    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            names = [n for n, _ in pl_module.named_children()]
            raise AttributeError(
                f"ReBasinMerge: submodule={self.submodule!r}: {type(pl_module).__name__} has no such submodule "
                f"(children: {names})"
            ) from None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Every other model loaded and checked (keys, shapes, finite) before any training time is spent."""
        if stage != "fit":
            return
        target = self._target(pl_module)
        self.others = []
        for i, source in enumerate(self.others_source):
            name = f"others[{i}]"
            state = match_reference(load_reference_state(source, parameter=name), target, parameter=name,
                                    prefix_hint=self.submodule)  # fmt: skip
            check_finite(state, name)
            other = copy.deepcopy(target)
            other.load_state_dict(state)
            self.others.append(other.requires_grad_(False).eval())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored is not None:  # a resumed run: the merged weights saved in the checkpoint
            merged = copy.deepcopy(self._target(pl_module))
            merged.load_state_dict(self._restored)
            self.merged_model, self._restored = merged.requires_grad_(False).eval(), None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._merge(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.others:
            return
        self._merge(trainer, pl_module)
        if self.write_back and self.merged_model is not None:
            target = self._target(pl_module)
            new = self.merged_model.state_dict()
            with torch.no_grad():  # every entry checked by load_state_dict's strict key/shape match first
                target.load_state_dict({k: v.to(t.device, t.dtype) for (k, v), t in
                                        zip(new.items(), target.state_dict().values())})  # fmt: skip

    # ------------------------------------------------------------------------------------------ merging
    def _data(self, trainer: pl.Trainer) -> Iterable[Any] | None:
        if self.data is not None:
            return self.data
        val = getattr(trainer, "val_dataloaders", None)
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        return val

    def _merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self._target(pl_module)
        snapshot = copy.deepcopy(target).eval()  # the trained model is only read
        device = module_device(snapshot)
        data = self._data(trainer)
        example = self.example_inputs
        if self.spec is None and example is None:
            source = data if data is not None else trainer.train_dataloader
            if source is not None:
                example = to_device(split_batch(next(iter(source)))[0], device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.result = merge(
                [snapshot, *self.others], spec=self.spec, example_inputs=example, method=self.method,  # type: ignore[arg-type]
                weights=self.weights, data=data, loss_fn=self.loss_fn, reset_bn=self.reset_bn,
                repair=self.repair, progress=self.progress, **self.merge_kwargs,
            )  # fmt: skip
        self.spec = self.result.spec  # traced once
        self.merged_model = self.result.merged.requires_grad_(False)
        self.merges += 1
        if data is None:
            if not self._warned:
                warnings.warn("ReBasinMerge: no data and no validation data: the merged model is not evaluated",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
                self._warned = True
            return
        ev = self.result.evaluate(data, self.loss_fn, max_batches=self.max_batches)
        metrics = {"merge/loss": ev.merged["loss"], "merge/barrier": ev.barrier,
                   "merge/ensemble_loss": ev.ensemble["loss"]}  # fmt: skip
        if "accuracy" in ev.merged:
            metrics.update({"merge/accuracy": ev.merged["accuracy"],
                            "merge/ensemble_accuracy": ev.ensemble["accuracy"]})  # fmt: skip
        self.metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {**metrics, "epoch": float(trainer.current_epoch)}, step=trainer.global_step
                )

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The merge count and the merged weights (a resumed run keeps its second set of weights)."""
        merged = (
            None
            if self.merged_model is None
            else {k: v.cpu() for k, v in self.merged_model.state_dict().items()}
        )
        return {"merges": self.merges, "merged": merged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.merges = int(state_dict.get("merges", 0))
        self._restored = state_dict.get("merged")
