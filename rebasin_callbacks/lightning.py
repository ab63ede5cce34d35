"""Lightning callbacks: align a model to a reference during training, and monitor linear mode connectivity.

* :class:`ReBasinAlign` permutes the trained model's hidden units (and the optimizer state) so that its
  weights sit in the reference's basin, every ``n`` epochs and/or when fitting ends.
* :class:`LMCMonitor` measures the loss/accuracy barrier and AUC along the straight line between the
  current model and the reference, naive and re-based, and logs them with the curve figure.

Both take the reference as an ``nn.Module``, a ``LightningModule``, a state dict or a checkpoint path
(a plain ``torch.save``'d state dict or a Lightning ``.ckpt``), and are configurable from a LightningCLI
YAML file. They are thin: the work is done by :func:`~rebasin_callbacks.align`,
:func:`~rebasin_callbacks.permute` and :func:`~rebasin_callbacks.lmc_curve`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from rebasin_callbacks.batches import split_batch
from rebasin_callbacks.checkpoints import ReferenceLike, load_reference_state, match_reference
from rebasin_callbacks.devices import follow, module_device
from rebasin_callbacks.lightning_fusion import ReBasinFusion
from rebasin_callbacks.lightning_guards import check_weight_holders, refuse_sharded
from rebasin_callbacks.lightning_sharing import (
    Alignment,
    StepAlignments,
    find,
    inverse,
    same_reference,
    step_records,
)
from rebasin_callbacks.lightning_spec import LazySpec
from rebasin_callbacks.lightning_weights import (
    own_averages,
    permute_training_state,
    target_module,
    wrapped_target,
)
from rebasin_callbacks.lmc import Evaluator, LMCResult
from rebasin_callbacks.permute import permute, permute_state_dict
from rebasin_callbacks.rasterise import figure_rgb
from rebasin_callbacks.rng import preserved_rng
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.spec_source import SpecLike
from rebasin_callbacks.states import check_finite, l2_distance
from rebasin_callbacks.threads import thread_limit

__all__ = [
    "ReBasinAlign",
    "LMCMonitor",
    "ReBasinFusion",
    "Evaluator",
    "ReferenceLike",
    "load_reference_state",
    "match_reference",
]


def _reference_module(reference: ReferenceLike, model: nn.Module, submodule: str | None) -> nn.Module:
    """A frozen copy of ``model``'s architecture holding the reference's weights (on ``model``'s device)."""
    state = match_reference(load_reference_state(reference), model, prefix_hint=submodule)
    check_finite(state, "reference")  # a NaN reference fails here, at setup, not after the first epoch
    ref = copy.deepcopy(model)  # LightningModule.__getstate__ drops the trainer, so this copies weights only
    ref.load_state_dict(state)
    ref.requires_grad_(False)
    return ref.eval()


def _check_every_n_epochs(every_n_epochs: int) -> None:
    if not isinstance(every_n_epochs, int) or every_n_epochs < 0:
        raise ValueError(
            f"every_n_epochs must be an int >= 0 (0 = never at epoch end), got {every_n_epochs!r}"
        )


def _trainer_loader(trainer: pl.Trainer, which: str, who: str) -> Any:
    """The Trainer's first training (``"train"``) or validation (``"val"``) dataloader."""
    loader = trainer.val_dataloaders if which == "val" else trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    if loader is None:
        raise RuntimeError(f"{who}: the Trainer has no {which} dataloader; pass one")
    return loader


def _align_kwargs(
    trainer: pl.Trainer, cost: Any, align_kwargs: Mapping[str, Any], who: str
) -> dict[str, Any]:
    """``align_kwargs``; a data cost without ``data`` gets the Trainer's training dataloader (its generators'
    state is restored afterwards by ``_isolated``) and cross-entropy unless ``loss_fn`` is given."""
    kwargs = dict(align_kwargs)
    if cost in ("mid", "rnd") and kwargs.get("data") is None:
        kwargs["data"] = _trainer_loader(trainer, "train", f"{who}(cost={cost!r})")
        kwargs.setdefault("loss_fn", F.cross_entropy)
    return kwargs


def _trainer_loaders(trainer: pl.Trainer) -> list[Any]:
    loaders: list[Any] = []
    for name in ("train_dataloader", "val_dataloaders"):
        try:
            value = getattr(trainer, name)
        except Exception:  # not loaded yet / no fit loop
            continue
        if isinstance(value, Mapping):
            loaders.extend(value.values())
        elif isinstance(value, (list, tuple)):
            loaders.extend(value)
        elif value is not None:
            loaders.append(value)
    return loaders


@contextlib.contextmanager
def _isolated(pl_module: nn.Module, loaders: Iterable[Any] = ()) -> Iterator[None]:
    """Keep the training run untouched: every random state (:func:`~rebasin_callbacks.rng.preserved_rng`:
    global generators and the given DataLoaders' own) and every submodule's train flag."""
    modes = {m: m.training for m in pl_module.modules()}
    try:
        with preserved_rng(loaders):
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _prepare(
    spec: LazySpec, reference: ReferenceLike, pl_module: pl.LightningModule, submodule: str | None
) -> nn.Module:
    """Setup-time checks (before any training time is spent): the submodule exists, the reference loads and
    fits it, and the spec fits it (traced now when example inputs are already known). Returns the
    reference module."""
    target = target_module(pl_module, submodule)
    compiled = [
        n for n, m in target.named_modules() if n and isinstance(getattr(m, "_orig_mod", None), nn.Module)
    ]
    if compiled and spec.source is None:
        # the tracer cannot look inside a compiled module: it would find nothing to permute there
        raise ValueError(
            f"submodule={submodule!r}: {type(target).__name__}.{compiled[0]} is a torch.compile'd module, "
            f"which a spec cannot be traced through; pass submodule={_join(submodule, compiled[0])!r} (the "
            "callbacks align the module it wraps) or spec=..."
        )
    ref = _reference_module(reference, target, submodule)
    if spec.ready(target, pl_module):
        spec.get(target, pl_module)  # resolved (and checked against the module) now
    spec.attach(wrapped_target(pl_module, submodule))  # a compiled module's own hooks run eagerly
    return ref


def _epoch(trainer: pl.Trainer, in_loop: bool) -> int:
    """The epoch a callback's work belongs to: the current one inside the loop; after it (``on_train_end``)
    Lightning's counter has moved past the last epoch, whose number this is (as in the loggers' rows)."""
    return trainer.current_epoch if in_loop else max(trainer.current_epoch - 1, 0)


def _log(
    trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float], in_loop: bool
) -> None:
    """Log on rank zero only: through ``pl_module.log`` inside the loop (the epoch's row), straight to the
    loggers after it, in one call with the epoch (one row, not one per metric)."""
    if in_loop:
        for name, value in metrics.items():
            pl_module.log(name, float(value), rank_zero_only=True, on_epoch=True, on_step=False)
    elif trainer.is_global_zero:
        # after the loop Lightning's epoch counter has moved past the last epoch: its row is the last one's
        row = {**metrics, "epoch": float(_epoch(trainer, in_loop))}
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)


def _params(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    names = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def _compute_perms(
    trainer: pl.Trainer,
    model: nn.Module,
    reference: nn.Module,
    spec: PermutationSpec,
    cost: Any,
    kwargs: dict,
    progress: bool = False,
) -> tuple[dict[str, Tensor], float, float]:
    """Permutations aligning ``model`` to ``reference`` and the parameters' L2 distance before/after them.

    Computed on rank 0 and broadcast, so that every rank applies exactly the same permutations. ``align``
    never returns permutations that its cost scores worse than the model as it is (the identity)."""
    payload = None
    if trainer.is_global_zero:
        from rebasin_callbacks.align import align

        kwargs = {"progress": progress, **kwargs}
        result = align(model, reference, spec=spec, cost=cost, **kwargs)
        perms = {g: p.detach().cpu() for g, p in result.perms.items()}
        state = _params(model, {k: v.detach() for k, v in model.state_dict().items()})
        ref_state = _params(reference, reference.state_dict())
        before = l2_distance(state, ref_state)
        after = l2_distance(_params(model, permute_state_dict(model.state_dict(), spec, perms)), ref_state)
        payload = (perms, before, after)
    received = trainer.strategy.broadcast(payload, src=0)
    assert received is not None
    return received


def _show_progress(trainer: pl.Trainer, enabled: bool) -> bool:
    return enabled and trainer.is_global_zero and trainer.progress_bar_callback is not None


def _reference_for(callback: Any, target: nn.Module) -> nn.Module:
    """The callback's reference on the target's device (moved once: lossless) and dtype (a copy if needed)."""
    callback._reference = callback._reference.to(module_device(target))
    return follow(callback._reference, target)


# --------------------------------------------------------------------------- ReBasinAlign
class _EpochEndCallback(Callback):
    """What both callbacks share: their settings, the reference prepared at ``setup`` (errors before any
    training step), work every ``every_n_epochs`` training epochs (at most once per epoch), and the
    alignments of the current step, which the other callbacks of the Trainer reuse."""

    #: settings that are part of ``state_key`` (they tell several instances apart in a checkpoint)
    _key_settings: tuple[str, ...] = ("submodule", "every_n_epochs")
    #: the name in messages and in the alignment records other callbacks read
    _name = "callback"

    def __init__(
        self,
        reference: ReferenceLike,
        *,
        every_n_epochs: int,
        submodule: str | None,
        cost: str,
        align_kwargs: dict[str, Any] | None,
        spec: SpecLike,
        example_inputs: Any,
        progress: bool,
        threads: int | str | None,
    ) -> None:
        _check_every_n_epochs(every_n_epochs)
        self.reference = reference
        self.every_n_epochs = every_n_epochs
        self.submodule = submodule
        self.cost = cost
        self.align_kwargs = dict(align_kwargs or {})
        self.progress = progress
        self.threads = threads
        self._spec = LazySpec(spec, example_inputs)
        self._reference: nn.Module | None = None
        #: one entry per alignment / evaluation (what ``state_dict`` saves)
        self.history: list[dict[str, float]] = []
        self._last_epoch = -1
        self._alignments = StepAlignments()  # this step's, for the other callbacks (``step_records``)

    @property
    @override
    def state_key(self) -> str:
        # several instances (e.g. one per submodule) keep separate checkpoint states
        return self._generate_state_key(**self._settings())

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, type(self).__name__)
        self._reference = _prepare(self._spec, self.reference, pl_module, self.submodule)
        self._alignments = StepAlignments()  # a new fit's step counter starts again

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._spec.detach()

    def should_update(self, epoch: int) -> bool:
        """Whether to work at the end of training epoch ``epoch`` (0-based); override for another schedule.

        The default: every ``every_n_epochs`` epochs (never when it is 0). Work happens at most once per
        epoch whatever this returns.

        Example:
            >>> class Late(ReBasinAlign):  # align only from epoch 10 on
            ...     def should_update(self, epoch: int) -> bool:
            ...         return epoch >= 10
        """
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch > self._last_epoch and self.should_update(epoch):
            self._run(trainer, pl_module, in_loop=True)
            self._last_epoch = epoch

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, in_loop: bool) -> None:
        raise NotImplementedError

    def _alignment_of(
        self,
        trainer: pl.Trainer,
        target: nn.Module,
        model: nn.Module,
        reference: nn.Module,
        spec: PermutationSpec,
        candidates: list[Alignment],
        version: int,
    ) -> Alignment:
        """The alignment of ``model`` (``target``'s weights after ``version`` in-place alignments of this
        step) to ``reference``: one of ``candidates`` when it matches (same weights, reference, spec, cost
        and settings), else a new one, computed on rank 0 and broadcast, which the caller records."""
        shared = find(candidates, version, reference, spec, self.cost, self.align_kwargs)
        if shared is not None:
            return shared
        kwargs = _align_kwargs(trainer, self.cost, self.align_kwargs, self._name)
        progress = _show_progress(trainer, self.progress)
        perms, before, after = _compute_perms(trainer, model, reference, spec, self.cost, kwargs, progress)
        settings = dict(self.align_kwargs)
        return Alignment(
            weakref.ref(target),
            trainer.global_step,
            version,
            reference,
            spec,
            self.cost,
            settings,
            perms,
            before,
            after,
            applied=False,
            owner=self._name,
        )

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._key_settings}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resume with changed settings (e.g. ``every_n_epochs``): Lightning finds a callback's state by
        ``state_key``, which holds the settings, so a changed setting would silently drop the state. Here
        the state saved by the same class for the same submodule is found (by the settings it saved), what
        is compatible is restored and the rest is named in a warning."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # same settings: Lightning restores it
        name = type(self).__qualname__
        found = [
            state
            for key, state in states.items()
            if isinstance(key, str)
            and key.startswith(name + "{")
            and isinstance(state, Mapping)
            and isinstance(state.get("settings"), Mapping)
            and state["settings"].get("submodule") == self.submodule
        ]
        if not found:
            return
        state = dict(found[0])
        saved = state["settings"]
        changed = {k: (v, getattr(self, k, None)) for k, v in saved.items() if getattr(self, k, None) != v}
        dropped = self._load_changed(state, changed)
        what = ", ".join(f"{k}={old!r} -> {new!r}" for k, (old, new) in changed.items())
        rank_zero_warn(
            f"{name}: resuming with changed settings ({what}): history and epoch counter restored"
            + (f"; not restored: {', '.join(dropped)}" if dropped else "")
            + "; the new settings apply from here on",
            category=UserWarning,
        )

    def _load_changed(self, state: dict[str, Any], changed: dict[str, tuple[Any, Any]]) -> list[str]:
        self.load_state_dict(state)
        return []


class ReBasinAlign(_EpochEndCallback):
    r"""Align the model being trained to a reference model by permuting its hidden units.

    Every ``every_n_epochs`` training epochs (after validation) and/or when fitting ends, the permutations
    that bring the LightningModule (or its ``submodule``) closest to ``reference`` are found with
    :func:`~rebasin_callbacks.align` (Sinkhorn re-basin; data-free L2 cost by default). A permutation of
    hidden units never changes what the network computes, so:

    * ``mode="inplace"`` permutes, all or nothing, everything in the Trainer that holds the trained weights:
      the parameters, the buffers (BatchNorm statistics), pending gradients (gradient accumulation), the
      state of every optimizer (Adam moments, momentum) and the averaged copy kept by Lightning's
      ``WeightAveraging`` / ``EMAWeightAveraging`` / ``StochasticWeightAveraging``, so the weights now live
      in the reference's basin (checkpoints saved afterwards too). What is guaranteed, at the moment of
      alignment: the network
      computes the same function (outputs equal up to float round-off: the permuted sums are added in
      another order) and every per-parameter optimizer state tensor is exactly the permuted one, so the
      next optimizer step is the permuted image of the step the unaligned run would take. What is not:
      bit-identical training afterwards. Summation order differs in every later forward and backward, so
      the two runs drift apart like runs on two machines (equivalent, not identical: e.g. logits within
      ~1e-5 after a few steps, further apart after epochs of training).
    * ``mode="copy"`` leaves the training untouched and keeps the aligned copy in :attr:`aligned_model`
      (saved in the callback's checkpoint state; ``torch.save(cb.aligned_model.state_dict(), path)``).

    Logged on rank zero: ``rebasin/l2_before``, ``rebasin/l2_after`` (weight distance to the reference)
    and ``rebasin/align_seconds``. Under DDP the permutations are computed on rank 0 and broadcast, so every
    rank ends with identical weights. Configuration errors (missing checkpoint, different architecture,
    unknown submodule, a strategy that shards parameters: FSDP, DeepSpeed) are raised at ``setup``, before
    any training time is spent. A ``torch.compile``'d submodule is aligned through the module it wraps.

    Args:
        reference: the model to align to: an ``nn.Module`` / ``LightningModule`` of the same architecture,
            a state dict, or a checkpoint path (``torch.save``'d state dict or Lightning ``.ckpt``; keys
            prefixed by the LightningModule's attribute name are matched automatically).
        every_n_epochs: align after every ``n``-th training epoch; ``0`` = never at epoch end.
        cost: :func:`~rebasin_callbacks.align`'s cost (``"l2"``, ``"mid"``, ``"rnd"``, ``"cosine"``). The
            data costs use the Trainer's training dataloader and cross-entropy unless ``align_kwargs``
            gives ``data`` / ``loss_fn``; BatchNorm layers use batch statistics there.
        mode: ``"inplace"`` or ``"copy"`` (see above).
        submodule: name of the submodule to align (e.g. ``"model"``); ``None`` = the whole LightningModule.
        at_fit_end: also align when fitting ends.
        align_kwargs: further keyword arguments for :func:`~rebasin_callbacks.align` (``steps``, ``lr``,
            ``init``, ``seed``, ...).
        spec: a :class:`~rebasin_callbacks.PermutationSpec`, a path to its JSON, or a function
            ``module -> spec`` (resolved once by :func:`~rebasin_callbacks.spec_source.resolve_spec`);
            traced by default from ``example_inputs`` or from the inputs the module receives in its first
            forward pass of the fit.
        example_inputs: inputs to trace the spec with.
        progress: show the alignment's progress (when the Trainer shows a progress bar).
        threads: CPU intra-op threads inside the alignment (:func:`~rebasin_callbacks.utils.thread_limit`):
            ``"auto"`` (``$REBASIN_NUM_THREADS``, else a small cap that keeps a busy machine fast), an int, or
            ``None`` for torch's setting. Restored afterwards: training keeps its own thread count.

    With :class:`LMCMonitor` attached too, the two share one alignment per step: whichever runs second
    reuses the first one's permutations (same reference, spec, cost and settings), and LMCMonitor
    measures its "naive" curve on the model as it was before this step's in-place alignment.
    The model being aligned decides the device and dtype; the reference is copied to them.

    Example::

        import torch
        from lightning.pytorch import Trainer
        from torch.utils.data import DataLoader, TensorDataset
        from rebasin_callbacks.demo import MNISTClassifier
        from rebasin_callbacks.lightning import ReBasinAlign

        data = DataLoader(TensorDataset(torch.rand(64, 784), torch.randint(0, 10, (64,))), batch_size=16)
        reference = MNISTClassifier(width=32)        # or "reference.ckpt", or a state dict
        align = ReBasinAlign(reference, submodule="model", align_kwargs={"steps": 20})
        trainer = Trainer(max_epochs=2, callbacks=[align], logger=False, enable_checkpointing=False)
        trainer.fit(MNISTClassifier(width=32), data)
        print(align.history[-1])    # {'epoch': 1, 'step': 8, 'l2_before': ..., 'l2_after': ..., 'seconds': ...}
    """

    def __init__(
        self,
        reference: ReferenceLike,
        *,
        every_n_epochs: int = 1,
        cost: str = "l2",
        mode: Literal["inplace", "copy"] = "inplace",
        submodule: str | None = None,
        at_fit_end: bool = False,
        align_kwargs: dict[str, Any] | None = None,
        spec: SpecLike = None,
        example_inputs: Any = None,
        progress: bool = True,
        threads: int | str | None = "auto",
    ) -> None:
        super().__init__(
            reference,
            every_n_epochs=every_n_epochs,
            submodule=submodule,
            cost=cost,
            align_kwargs=align_kwargs,
            spec=spec,
            example_inputs=example_inputs,
            progress=progress,
            threads=threads,
        )
        if mode not in ("inplace", "copy"):
            raise ValueError(f"mode must be 'inplace' or 'copy', got {mode!r}")
        if every_n_epochs == 0 and not at_fit_end:
            raise ValueError("every_n_epochs=0 and at_fit_end=False: the callback would never align")
        self.mode = mode
        self.at_fit_end = at_fit_end
        self.aligned_model: nn.Module | None = None
        #: permutations of the last alignment ``{group: LongTensor}`` (relative to the weights before it)
        self.last_perms: dict[str, Tensor] | None = None
        self._pending_aligned_state: dict[str, Tensor] | None = None

    @property
    def spec(self) -> PermutationSpec | None:
        """The permutation spec in use (``None`` until known)."""
        return self._spec.spec

    _key_settings = ("submodule", "mode", "every_n_epochs")
    _name = "ReBasinAlign"

    def _load_changed(self, state: dict[str, Any], changed: dict[str, tuple[Any, Any]]) -> list[str]:
        dropped = []
        if "mode" in changed and state.get("aligned_state_dict") is not None:
            state = {k: v for k, v in state.items() if k != "aligned_state_dict"}
            dropped.append("the aligned copy of mode='copy'")
        self.load_state_dict(state)
        return dropped

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.mode == "inplace":
            check_weight_holders(trainer, "ReBasinAlign", "mode='copy'")
            own_averages(pl_module, target_module(pl_module, self.submodule), self.submodule)  # refused now

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, in_loop: bool) -> None:
        self._align(trainer, pl_module, in_loop=in_loop)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # skip when the last epoch's alignment already saw these weights (no optimizer step since)
        if self.at_fit_end and not (self.history and self.history[-1]["step"] == trainer.global_step):
            self._align(trainer, pl_module, in_loop=False)

    def _align(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, in_loop: bool) -> None:
        assert self._reference is not None, "setup() was not called"
        target = target_module(pl_module, self.submodule)
        reference = _reference_for(self, target)
        start = time.perf_counter()
        with _isolated(pl_module, _trainer_loaders(trainer)), thread_limit(self.threads):
            spec = self._spec.get(target, pl_module)
            candidates = step_records(trainer, target, trainer.global_step)
            version = sum(r.applied for r in candidates)
            found = self._alignment_of(trainer, target, target, reference, spec, candidates, version)
            if any(found is r for r in candidates):  # LMCMonitor already aligned these very weights: reuse
                rank_zero_info(f"ReBasinAlign: reusing the alignment {found.owner} computed at this step")
            if self.mode == "inplace":
                permute_training_state(trainer, pl_module, target, spec, found.perms, self.submodule)
            else:
                self.aligned_model = permute(target, spec, found.perms)
                self.aligned_model.requires_grad_(False)
            settings = dict(self.align_kwargs)
            applied = self.mode == "inplace"
            kept = replace(
                found, reference=reference, spec=spec, kwargs=settings, applied=applied, owner=self._name
            )
            self._alignments.add(kept)
        self._report(trainer, pl_module, found, time.perf_counter() - start, in_loop)

    def _report(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        found: Alignment,
        seconds: float,
        in_loop: bool,
    ) -> None:
        """Keep the alignment in :attr:`last_perms` and :attr:`history`, log it and say it."""
        before, after = found.before, found.after
        self.last_perms = found.perms
        epoch = _epoch(trainer, in_loop)
        record = {"epoch": epoch, "step": trainer.global_step, "l2_before": before}
        record.update(l2_after=after, seconds=seconds)
        self.history.append(record)
        metrics = {"rebasin/l2_before": before, "rebasin/l2_after": after, "rebasin/align_seconds": seconds}
        _log(trainer, pl_module, metrics, in_loop)
        rank_zero_info(
            f"ReBasinAlign: epoch {epoch}: L2 distance to the reference {before:.4g} -> "
            f"{after:.4g} ({seconds:.2f} s)"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "settings": self._settings(),
            "last_epoch": self._last_epoch,
            "history": [dict(h) for h in self.history],
            "last_perms": self.last_perms,
            "spec": self.spec.to_dict() if self.spec is not None else None,
        }
        if self.mode == "copy" and self.aligned_model is not None:
            state["aligned_state_dict"] = {
                k: v.detach().cpu() for k, v in self.aligned_model.state_dict().items()
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_epoch = int(state_dict["last_epoch"])
        self.history = [dict(h) for h in state_dict["history"]]
        self.last_perms = state_dict.get("last_perms")
        if state_dict.get("spec") is not None and self._spec.spec is None and self._spec.source is None:
            self._spec.source = PermutationSpec.from_dict(state_dict["spec"])
        self._pending_aligned_state = state_dict.get("aligned_state_dict")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the checkpoint's callback state is loaded after setup: rebuild the aligned copy from it
        if self._pending_aligned_state is not None:
            model = copy.deepcopy(target_module(pl_module, self.submodule))
            model.load_state_dict(self._pending_aligned_state)
            self.aligned_model = model.requires_grad_(False)
            self._pending_aligned_state = None


# --------------------------------------------------------------------------- LMCMonitor
LossFn = Callable[[Tensor, Tensor], Tensor]


def _non_finite(model: nn.Module) -> str | None:
    """The message naming ``model``'s first NaN/inf entry, or None when all are finite."""
    try:
        check_finite(model, "the trained model")
    except ValueError as err:
        return str(err)
    return None


def _nan_curve(n_points: int, label: str) -> LMCResult:
    lambdas = [i / (n_points - 1) for i in range(n_points)]
    return LMCResult.from_values(lambdas, {"loss": [math.nan] * n_points}, label=label)


def _sized(data: Any) -> bool:
    """Whether ``data`` has a length (a DataLoader over an ``IterableDataset`` without ``__len__`` has none)."""
    try:
        len(data)
    except TypeError:
        return False
    return True


def _has_val_source(trainer: pl.Trainer) -> bool:
    """Whether this fit has a validation dataloader source (loaded or not yet).

    Lightning loads validation dataloaders lazily, after ``setup``; its data source object knows whether
    one was given. Where that internal is missing (another Lightning version), assume there is one."""
    val_loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
    source = getattr(val_loop, "_data_source", None)
    is_defined = getattr(source, "is_defined", None)
    return bool(is_defined()) if callable(is_defined) else True


class LMCMonitor(_EpochEndCallback):
    r"""Log linear mode connectivity between the model being trained and a reference.

    Every ``every_n_epochs`` training epochs (after validation), evaluates loss and accuracy at
    ``n_points`` evenly spaced points of the segment ``(1 - lam) * model + lam * reference`` with
    :func:`~rebasin_callbacks.lmc_curve`, once as is (``naive``) and once after aligning the model to the
    reference (``rebasin``, when ``align=True``), and logs to every logger of the Trainer (rank zero):

    * ``lmc/{naive,rebasin}_barrier`` and ``lmc/{naive,rebasin}_auc`` (loss; supplement Eq. 2 and 3),
      ``lmc/{naive,rebasin}_acc_barrier`` and ``..._acc_auc`` (accuracy);
    * the curve figure through the logger's own image API: ``log_image(key="lmc", ...)`` where the logger
      has it (W&B, Neptune), ``add_figure("lmc", ...)`` on TensorBoard, ``log_figure`` on MLflow; with no
      such logger a PNG ``lmc_epoch{N}.png`` in ``save_dir`` (default: the Trainer's log dir).

    The model being trained is never modified (copies are evaluated; train/eval modes, Python's
    ``random``, NumPy's global generator, torch's CPU and CUDA generators and the DataLoaders' own
    generators are restored, so ``data="train"`` with augmentations and ``reset_bn=True`` change neither
    the data nor the shuffling order): training and validation metrics are the same as without the
    callback. Each point reads at most ``max_batches`` batches and no more than the Trainer reads
    (``limit_train_batches`` / ``limit_val_batches``); data without a length and without such a limit is
    refused before training (it could be endless). Under DDP every rank evaluates its shard of the dataloader and the
    sums are reduced. Batches may be ``(inputs, targets)`` pairs or dicts with input/target keys
    (:func:`~rebasin_callbacks.utils.split_batch`); the first batch is checked when the fit starts.

    With :class:`ReBasinAlign` (``mode="inplace"``) attached too, "naive" is measured on the model as it
    was before that step's in-place alignment (the permutation is undone on a copy), and "re-based" reuses
    ReBasinAlign's alignment when it is to the same reference with the same cost (logged once; the result
    entry ``"rebasin_source"`` says which callback aligned). One alignment per step is computed in all:
    whichever callback runs second reuses the first one's.

    Args:
        reference: like :class:`ReBasinAlign`'s.
        every_n_epochs: evaluate after every ``n``-th training epoch; ``0`` = only when fitting ends.
        n_points: points on the segment, endpoints included.
        align: also evaluate the re-based curve.
        data: ``"val"`` (the Trainer's first validation dataloader), ``"train"``, or any iterable of
            ``(inputs, targets)`` batches.
        reset_bn / repair: passed to :func:`~rebasin_callbacks.lmc_curve` (BatchNorm statistics are reset
            on the training dataloader).
        save_dir: where PNG figures go when the logger cannot take a figure.
        submodule: name of the submodule that is compared (``None`` = the LightningModule).
        cost / align_kwargs / spec / example_inputs: alignment settings, as in :class:`ReBasinAlign`.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        max_batches: evaluate at most this many batches per point (needed for data without a length).
        progress: show progress over the curve's points (when the Trainer shows a progress bar).
        threads: CPU intra-op threads inside the evaluation, as in :class:`ReBasinAlign`.

    Example::

        import torch
        from lightning.pytorch import Trainer
        from torch.utils.data import DataLoader, TensorDataset
        from rebasin_callbacks.demo import MNISTClassifier
        from rebasin_callbacks.lightning import LMCMonitor

        data = DataLoader(TensorDataset(torch.rand(64, 784), torch.randint(0, 10, (64,))), batch_size=16)
        monitor = LMCMonitor(MNISTClassifier(width=32), submodule="model", n_points=5, save_dir="lmc")
        trainer = Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False)
        trainer.fit(MNISTClassifier(width=32), data, data)
        print(monitor.results[-1]["naive"].barrier, monitor.results[-1]["rebasin"].barrier)
    """

    _name = "LMCMonitor"

    def __init__(
        self,
        reference: ReferenceLike,
        *,
        every_n_epochs: int = 1,
        n_points: int = 11,
        align: bool = True,
        data: Any = "val",
        reset_bn: bool = False,
        repair: bool = False,
        save_dir: str | None = None,
        submodule: str | None = None,
        cost: str = "l2",
        align_kwargs: dict[str, Any] | None = None,
        spec: SpecLike = None,
        example_inputs: Any = None,
        loss_fn: LossFn | None = None,
        max_batches: int | None = None,
        progress: bool = True,
        threads: int | str | None = "auto",
    ) -> None:
        super().__init__(
            reference,
            every_n_epochs=every_n_epochs,
            submodule=submodule,
            cost=cost,
            align_kwargs=align_kwargs,
            spec=spec,
            example_inputs=example_inputs,
            progress=progress,
            threads=threads,
        )
        if not isinstance(n_points, int) or n_points < 2:
            raise ValueError(f"n_points must be an int >= 2, got {n_points!r}")
        if isinstance(data, str) and data not in ("val", "train"):
            raise ValueError(f"data must be 'val', 'train' or an iterable of batches, got {data!r}")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")
        self.n_points = n_points
        self.align = align
        self.data = data
        self.reset_bn = reset_bn
        self.repair = repair
        self.save_dir = save_dir
        self.loss_fn: LossFn = loss_fn or F.cross_entropy
        self.max_batches = max_batches
        self._batch_checked = False
        self._told_reuse = False
        #: one entry per evaluation: ``{"epoch": int, "naive": LMCResult, "rebasin": LMCResult}``
        self.results: list[dict[str, Any]] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.data == "val" and not _has_val_source(trainer):
            # fail now, not after the first training epoch
            raise ValueError(
                "LMCMonitor(data='val'): this fit has no validation dataloader (none passed to "
                "Trainer.fit, no val_dataloader() on the module or datamodule); pass val_dataloaders, or "
                "LMCMonitor(data='train' or an iterable of (x, y) batches)"
            )
        if stage == "fit" and not isinstance(self.data, str):
            if self.max_batches is None and not _sized(self.data):
                raise ValueError(
                    f"LMCMonitor(data={type(self.data).__name__}): the data has no length (an iterable or "
                    "IterableDataset may never end); pass max_batches=N"
                )
            self._check_loader(self.data)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the training dataloader is loaded now, before the first step: an endless one is refused here
        if self.data == "train" and self.max_batches is None and math.isinf(trainer.num_training_batches):
            raise ValueError(
                "LMCMonitor(data='train'): the training dataloader has no length (an IterableDataset) and "
                "the Trainer reads it without limit; pass max_batches=N, or Trainer(limit_train_batches=N)"
            )

    def _batch_limit(self, trainer: pl.Trainer, loader: Any) -> int | None:
        """How many batches a point of the curve reads: ``max_batches``, within the Trainer's own limit
        for its dataloaders (``limit_train_batches`` / ``limit_val_batches``). Never unbounded on data
        without a length."""
        limits: list[float] = [self.max_batches] if self.max_batches is not None else []
        if self.data == "train":
            limits.append(trainer.num_training_batches)
        elif self.data == "val" and trainer.num_val_batches:
            limits.append(trainer.num_val_batches[0])
        finite = [int(n) for n in limits if not math.isinf(n)]
        if finite:
            return min(finite)
        if not _sized(loader):
            raise ValueError(
                f"LMCMonitor(data={self._describe()}): the data has no length and no limit; pass max_batches=N"
            )
        return None

    def _check_batch(self, batch: Any) -> None:
        if self._batch_checked:
            return
        try:
            _, y = split_batch(batch)
        except TypeError as err:
            raise TypeError(f"LMCMonitor(data={self._describe()}): {err}") from None
        if y is None:
            raise TypeError(
                f"LMCMonitor(data={self._describe()}): its batches hold no targets (a "
                f"{type(batch).__name__}); the curves need (inputs, targets) pairs or dicts with a target key"
            )
        self._batch_checked = True

    def _describe(self) -> str:
        return repr(self.data) if isinstance(self.data, str) else type(self.data).__name__

    def _check_loader(self, loader: Any) -> None:
        """Check a user-given loader's first batch now (a re-iterable only: an iterator would lose it)."""
        try:
            if iter(loader) is loader:
                return
        except TypeError:
            raise TypeError(
                f"LMCMonitor(data=...): expected 'val', 'train' or an iterable of batches, got "
                f"{type(loader).__name__}"
            ) from None
        with _isolated(nn.Module(), [loader]):
            first = next(iter(loader), None)
        if first is None:
            raise ValueError("LMCMonitor(data=...): the dataloader yields no batches")
        self._check_batch(first)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the batch format is checked on the first batch, not after the first epoch
        if self.data == "train":
            self._check_batch(batch)

    @override
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.data == "val" and dataloader_idx == 0 and trainer.state.fn == "fit":
            self._check_batch(batch)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, in_loop: bool) -> None:
        self.evaluate(trainer, pl_module, in_loop=in_loop)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module, in_loop=False)

    def _loader(self, trainer: pl.Trainer) -> Any:
        if not isinstance(self.data, str):
            return self.data
        return _trainer_loader(trainer, self.data, f"LMCMonitor(data={self.data!r})")

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, in_loop: bool = False) -> dict:
        """Evaluate (and log) the curves now; returns ``{"epoch", "naive", "rebasin", "rebasin_source"}``."""
        assert self._reference is not None, "setup() was not called"
        target = target_module(pl_module, self.submodule)
        reference = _reference_for(self, target)
        loader = self._loader(trainer)
        evaluate = Evaluator(
            loader, self.loss_fn, self._batch_limit(trainer, loader), trainer.strategy.reduce
        )
        epoch = _epoch(trainer, in_loop)
        out: dict[str, Any] = {"epoch": epoch}
        broken = _non_finite(target)
        if broken is not None:  # a diverged run: say so, log NaN (never a curve that looks fine), go on
            rank_zero_warn(f"LMCMonitor: epoch {epoch}: {broken}; its curves are logged as NaN")
            for name, label in (("naive", "naive"), ("rebasin", "re-based"))[: 2 if self.align else 1]:
                out[name] = _nan_curve(self.n_points, label)
        else:
            with _isolated(pl_module, [loader, *_trainer_loaders(trainer)]), thread_limit(self.threads):
                out.update(self._curves(trainer, pl_module, target, reference, evaluate))
        metrics: dict[str, float] = {}
        for name in ("naive", "rebasin"):
            if name in out:
                metrics.update(_curve_metrics(f"lmc/{name}", out[name]))
        self.results.append(out)
        self.history.append({"epoch": float(epoch), **metrics})
        _log(trainer, pl_module, metrics, in_loop)
        self._log_figure(trainer, pl_module, out)
        return out

    def _curves(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        target: nn.Module,
        reference: nn.Module,
        evaluate: Evaluator,
    ) -> dict[str, Any]:
        """The naive curve (the model as it was before this step's in-place alignments) and the re-based
        one, with the callback whose alignment it used."""
        from rebasin_callbacks.lmc import lmc_curve

        kwargs: dict[str, Any] = {"n_points": self.n_points, "reset_bn": self.reset_bn, "repair": self.repair}
        kwargs["progress"] = _show_progress(trainer, self.progress)
        if self.reset_bn or self.repair:
            kwargs["bn_data"] = trainer.train_dataloader
        candidates = step_records(trainer, target, trainer.global_step)
        applied = [r for r in candidates if r.applied]
        model = copy.deepcopy(target).eval()
        for r in reversed(applied):  # undo this step's in-place alignments, newest first
            model = permute(model, r.spec, inverse(r.perms))
        out: dict[str, Any] = {"naive": lmc_curve(model, reference, evaluate, label="naive", **kwargs)}
        if self.align:
            last = applied[-1] if applied else None
            if last is not None and last.cost == self.cost and same_reference(last.reference, reference):
                rebased = copy.deepcopy(target).eval()  # already aligned in place: reuse, no re-alignment
                self._tell_reuse(last.owner)
                out["rebasin_source"] = last.owner
            else:
                spec = self._spec.get(model, pl_module)
                found = self._alignment_of(trainer, target, model, reference, spec, candidates, 0)
                if not any(found is r for r in candidates):
                    self._alignments.add(found)
                rebased = permute(model, spec, found.perms)
                out["rebasin_source"] = found.owner
            out["rebasin"] = lmc_curve(rebased, reference, evaluate, label="re-based", **kwargs)
        return out

    def _tell_reuse(self, owner: str) -> None:
        if not self._told_reuse:
            rank_zero_info(
                f"LMCMonitor: the re-based curve reuses {owner}'s in-place alignment of the same step (same "
                "reference and cost); 'naive' is the model before it"
            )
            self._told_reuse = True

    def _log_figure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        from rebasin_callbacks.lmc import plot_lmc
        from rebasin_callbacks.plotting import save_figure

        curves = [out[k] for k in ("naive", "rebasin") if k in out]
        split = self.data if isinstance(self.data, str) else "given data"
        model = type(target_module(pl_module, self.submodule)).__name__
        title = f"{model} (A) at epoch {out['epoch']} -> reference (B), {split} split"
        fig = plot_lmc(curves, title=title)  # a pyplot-free Figure: nothing to close
        logged = False
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if callable(log_image):  # Lightning's image API: W&B, Neptune, ...
                log_image(key="lmc", images=[figure_rgb(fig)], step=trainer.global_step)
                logged = True
                continue
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure("lmc", fig, global_step=trainer.global_step, close=False)
                logged = True
            elif (
                experiment is not None
                and hasattr(experiment, "log_figure")
                and getattr(logger, "run_id", None)
            ):
                run_id = getattr(logger, "run_id")  # noqa: B009
                experiment.log_figure(run_id, fig, f"lmc_epoch{out['epoch']}.png")  # MLflow
                logged = True
        if logged:
            return
        save_dir = self.save_dir or trainer.log_dir or trainer.default_root_dir
        path = Path(save_dir) / f"lmc_epoch{out['epoch']}.png"
        save_figure(fig, path, dpi=100)
        out["figure_path"] = str(path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self._settings(),
            "last_epoch": self._last_epoch,
            "history": [dict(h) for h in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_epoch = int(state_dict["last_epoch"])
        self.history = [dict(h) for h in state_dict["history"]]


def _curve_metrics(prefix: str, result: Any) -> dict[str, float]:
    metrics = {f"{prefix}_barrier": float(result.barrier), f"{prefix}_auc": float(result.auc)}
    barriers = getattr(result, "barriers", None) or {}
    aucs = getattr(result, "aucs", None) or {}
    if "accuracy" in barriers:
        metrics[f"{prefix}_acc_barrier"] = float(barriers["accuracy"])
    if "accuracy" in aucs:
        metrics[f"{prefix}_acc_auc"] = float(aucs["accuracy"])
    return metrics
