"""Lightning callback: re-basin incremental learning across successive ``trainer.fit`` calls.

Call ``trainer.fit(module, datamodule_e)`` once per episode with the same :class:`ReBasinFusion` callback
(and the same module). The first fit trains the module normally with its own ``configure_optimizers``.
Every later fit trains, instead of the module's weights, re-basin permutations and a residual
(:class:`~rebasin_callbacks.incremental.ReBasinIncremental`, Procedure 1 of the supplement) and ends
with the fusion ``theta_e = (1 - alpha) theta_{e-1} + alpha pi_P(theta_{e-1}) + delta`` written into the
module. The module's ``training_step`` and ``validation_step`` run unchanged, evaluated on the episode's
model through ``torch.func.functional_call``; the residual penalty ``beta ||delta||^2`` is added to the loss
they return.

Example:
    >>> import lightning.pytorch as pl
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from rebasin_callbacks import PermutationSpec
    >>> from rebasin_callbacks.lightning_fusion import ReBasinFusion
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ...     def forward(self, x):
    ...         return self.model(x)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return torch.nn.functional.cross_entropy(self(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.Adam(self.parameters(), lr=1e-3)
    >>> net = Net()
    >>> spec = PermutationSpec.from_axes({"0.weight": ("H", None), "0.bias": ("H",),
    ...     "2.weight": (None, "H"), "2.bias": (None,)}, net.model.state_dict())
    >>> fusion = ReBasinFusion(alpha=0.8, beta=0.1, spec=spec, submodule="model")
    >>> for episode in range(2):
    ...     data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=32)
    ...     trainer = pl.Trainer(max_epochs=1, callbacks=[fusion], logger=False, enable_checkpointing=False,
    ...                          enable_progress_bar=False, enable_model_summary=False)
    ...     trainer.fit(net, data)
    >>> fusion.fits_completed, fusion.incremental.episodes_done
    (2, 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.func import functional_call

from rebasin_callbacks.batches import to_device
from rebasin_callbacks.devices import module_device, module_dtype
from rebasin_callbacks.incremental import (
    Fusion,
    ReBasinIncremental,
    SpecSource,
    check_fraction,
    check_non_negative,
)
from rebasin_callbacks.lightning_guards import refuse_sharded, weight_averagers

__all__ = ["ReBasinFusion"]

_PATCHED = ("training_step", "validation_step", "configure_optimizers")


class _StepCaller(nn.Module):
    """Holds the LightningModule as a child so ``functional_call`` can swap its tensors around one step."""

    def __init__(self, module: nn.Module, method: Any):
        super().__init__()
        self.module = module
        self._method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)


def _add_penalty(output: Any, penalty: Tensor) -> Any:
    if isinstance(output, Tensor):
        return output + penalty.to(output.device)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        out = dict(output)
        out["loss"] = out["loss"] + penalty.to(out["loss"].device)
        return out
    if output is None:  # the step chose to skip this batch
        return None
    raise TypeError(
        "ReBasinFusion: training_step must return a loss tensor, a dict with a 'loss' tensor, or None; "
        f"got {type(output).__name__}"
    )


class ReBasinFusion(pl.Callback):
    """Re-basin residual fusion of successive ``trainer.fit`` calls (one call per episode).

    Args:
        alpha: fusion weight of the permuted model, in ``[0, 1]`` (paper: 0.8).
        beta: residual penalty weight (paper: 0.1).
        lr_perm / lr_delta: Adam learning rate of the permutations, SGD learning rate of the residual.
        spec: a :class:`~rebasin_callbacks.PermutationSpec` of the (sub)module, or a function
            ``module -> spec``; traced from ``example_inputs`` when omitted.
        example_inputs: inputs for :func:`~rebasin_callbacks.trace_spec`.
        submodule: attribute path of the network inside the LightningModule (``"model"``); the whole
            LightningModule when omitted. Its state_dict names are the spec's keys.
        fusion: ``"permuted"`` (default) or ``"literal"`` (the supplement's printed formula).
        incremental_kwargs: any other :class:`~rebasin_callbacks.incremental.ReBasinIncremental` argument.
    """

    def __init__(
        self,
        alpha: float = 0.8,
        beta: float = 0.1,
        *,
        lr_perm: float = 0.1,
        lr_delta: float = 0.05,
        spec: SpecSource | None = None,
        example_inputs: Any = None,
        submodule: str | None = None,
        fusion: Fusion = "permuted",
        incremental_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        # validate now: a bad value should fail here, not after the first fit
        if fusion not in ("permuted", "literal"):
            raise ValueError(f"fusion must be 'permuted' or 'literal', got {fusion!r}")
        self.alpha, self.beta = check_fraction("alpha", alpha), check_non_negative("beta", beta)
        self.lr_perm = check_non_negative("lr_perm", lr_perm)
        self.lr_delta = check_non_negative("lr_delta", lr_delta)
        self.fusion: Fusion = fusion
        self.spec, self.example_inputs, self.submodule = spec, example_inputs, submodule
        self.incremental_kwargs = dict(incremental_kwargs or {})
        self.incremental: ReBasinIncremental | None = None
        self.fits_completed = 0
        self._saved: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ helpers
    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.submodule is None:
            return pl_module
        try:
            target = pl_module.get_submodule(self.submodule)
        except AttributeError as exc:
            raise AttributeError(
                f"ReBasinFusion: {type(pl_module).__name__} has no submodule {self.submodule!r}"
            ) from exc
        return target

    def _make_incremental(self, target: nn.Module) -> ReBasinIncremental:
        inc = ReBasinIncremental(
            target,
            spec=self.spec,
            example_inputs=self.example_inputs,
            alpha=self.alpha,
            beta=self.beta,
            lr_perm=self.lr_perm,
            lr_delta=self.lr_delta,
            fusion=self.fusion,
            **self.incremental_kwargs,
        )
        return inc

    def _patch(self, pl_module: pl.LightningModule, inc: ReBasinIncremental) -> None:
        prefix = "module." + (f"{self.submodule}." if self.submodule else "")

        def run_on_episode_model(name: str, add_penalty: bool) -> Any:
            method = getattr(pl_module, name)

            def step(*args: Any, **kwargs: Any) -> Any:
                state = {prefix + k: v for k, v in inc.training_state().items()}
                caller = _StepCaller(pl_module, method)
                out = functional_call(caller, state, args, kwargs, tie_weights=True, strict=False)
                return _add_penalty(out, inc.penalty()) if add_penalty else out

            return step

        self._saved = {name: pl_module.__dict__.get(name) for name in _PATCHED}
        pl_module.training_step = run_on_episode_model("training_step", True)  # type: ignore[method-assign]
        # patch validation only where the module defines it (Lightning skips the loop otherwise)
        if type(pl_module).validation_step is not pl.LightningModule.validation_step:
            pl_module.validation_step = run_on_episode_model("validation_step", False)  # type: ignore[method-assign]
        pl_module.configure_optimizers = inc.optimizer  # type: ignore[method-assign,assignment]

    def _unpatch(self, pl_module: pl.LightningModule) -> None:
        for name, value in self._saved.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value
        self._saved = {}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, "ReBasinFusion")
        averaging = weight_averagers(trainer)
        if averaging and self.fits_completed > 0:
            # in an episode the module's weights are not what is trained, and the averaging callback
            # would write its average over the fused weights when fitting ends
            raise MisconfigurationException(
                f"ReBasinFusion: {averaging[0]} averages the module's weights, which an episode after the "
                "first does not train (it trains permutations and a residual); remove it from this fit"
            )
        target = self._target(pl_module)
        if self.incremental is None:
            self.incremental = self._make_incremental(target)
            if self._pending is not None:
                self.incremental.load_state_dict(self._pending)
        self.incremental.model = target
        if self.fits_completed == 0:
            return  # the first task is trained normally
        # Lightning moves the module to its device after setup(): the episode starts on that device
        target.to(trainer.strategy.root_device)
        if (
            self.example_inputs is not None
        ):  # the spec is traced again each episode: inputs where the model is
            self.incremental.example_inputs = to_device(
                self.example_inputs, module_device(target), module_dtype(target)
            )
        self.incremental.begin_episode()
        self._patch(pl_module, self.incremental)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.incremental is not None and self.incremental.in_episode:
            self._unpatch(pl_module)
            self.incremental.end_episode()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fits_completed += 1

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # an interrupted fit leaves theta_{e-1} untouched
        if self._saved:
            self._unpatch(pl_module)
        if self.incremental is not None and self.incremental.in_episode:
            self.incremental.abort_episode()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"fits_completed": self.fits_completed}
        if self.incremental is not None:
            state["incremental"] = self.incremental.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fits_completed = int(state_dict["fits_completed"])
        self._pending = state_dict.get("incremental")
        if self.incremental is not None and self._pending is not None:
            self.incremental.load_state_dict(self._pending)
