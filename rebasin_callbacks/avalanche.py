"""Avalanche strategy for re-basin incremental learning (Procedure 1 of the supplement).

:class:`ReBasinStrategy` is an Avalanche ``SupervisedTemplate``: the first experience is trained normally
with the optimizer you give it; every later experience trains re-basin permutations plus a residual
(:class:`~rebasin_callbacks.incremental.ReBasinIncremental`) and ends with the fusion
``theta_e = (1 - alpha) theta_{e-1} + alpha pi_P(theta_{e-1}) + delta``. Avalanche's EvaluationPlugin
metrics (accuracy, forgetting, ...) and loggers see the fused model after each experience, exactly as for
any other strategy. Task-labelled models (``avalanche.models.MultiTaskModule``, e.g. with a
``MultiHeadClassifier``) are supported: the heads grow as usual and every head is permuted with the
features it reads. Plugins compose as usual: the authors' released experiment is
``ReBasinStrategy(..., incremental_kwargs=RELEASED_SETTINGS, plugins=[ReplayPlugin(mem_size=1000)])``
(:data:`~rebasin_callbacks.incremental.RELEASED_SETTINGS`; measured in ``benchmarks/incremental.py``).

Example:
    >>> import torch
    >>> from avalanche.benchmarks import tensors_benchmark
    >>> from rebasin_callbacks import PermutationSpec
    >>> from rebasin_callbacks.avalanche import ReBasinStrategy
    >>> xs = [torch.randn(64, 4) for _ in range(2)]
    >>> ys = [torch.randint(0, 3, (64,)) for _ in range(2)]
    >>> bench = tensors_benchmark(list(zip(xs, ys)), list(zip(xs, ys)), task_labels=[0, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> spec = PermutationSpec.from_axes(
    ...     {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)},
    ...     net.state_dict())
    >>> strategy = ReBasinStrategy(model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
    ...                            spec=spec, train_mb_size=32, train_epochs=1, evaluator=None)
    >>> for exp in bench.train_stream:
    ...     _ = strategy.train(exp, eval_streams=[])
    >>> strategy.incremental.episodes_done
    1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from rebasin_callbacks.incremental import Fusion, ReBasinIncremental, SpecSource, extend_spec_to_heads
from rebasin_callbacks.spec import PermutationSpec

__all__ = ["ReBasinStrategy"]


def _with_heads(source: SpecSource | None, example_inputs: Any, heads_prefix: str) -> SpecSource:
    """A spec function that builds the base spec, then gives every head the axes of the traced one."""

    def build(model: nn.Module) -> PermutationSpec:
        if isinstance(source, PermutationSpec):
            base = source
        elif source is not None:
            base = source(model)
        else:
            from rebasin_callbacks.trace import trace_spec

            base = trace_spec(model, example_inputs)
        return extend_spec_to_heads(base, model.state_dict(), heads_prefix)

    return build


class ReBasinStrategy(SupervisedTemplate):
    """Re-basin incremental learning as an Avalanche strategy.

    Args:
        model: the model (a plain ``nn.Module`` or an Avalanche ``MultiTaskModule``).
        optimizer: the optimizer of the first experience, trained normally (paper: Adam, lr 0.001).
        criterion: the task loss (cross entropy by default).
        spec: a :class:`~rebasin_callbacks.PermutationSpec` or a function ``model -> spec`` called at
            the start of every re-basin experience; traced from ``example_inputs`` when omitted.
        example_inputs: inputs for tracing the spec (for a ``MultiTaskModule``: ``(x, task_labels)``).
        heads_prefix: state_dict prefix of the heads of a multi-head model (e.g. ``"classifier.classifiers."``):
            every head gets the axes the spec gives one of them, so old heads follow the permuted
            features. Detected for an ``avalanche.models.MultiHeadClassifier`` when omitted.
        alpha / beta / lr_perm / lr_delta / fusion / incremental_kwargs: passed to
            :class:`~rebasin_callbacks.incremental.ReBasinIncremental` (paper: alpha 0.8, beta 0.1,
            Adam lr 0.1 for the permutations, SGD lr 0.05 for the residual).
        train_mb_size / train_epochs / eval_mb_size / device / plugins / evaluator / eval_every /
            base_kwargs: as for any Avalanche ``SupervisedTemplate`` (paper: batch 500, 5 epochs).

    Periodic evaluation inside an experience (``eval_every > 0``) evaluates ``theta_{e-1}``: the fused
    model exists only at the end of the experience.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
        spec: SpecSource | None = None,
        example_inputs: Any = None,
        heads_prefix: str | None = None,
        alpha: float = 0.8,
        beta: float = 0.1,
        lr_perm: float = 0.1,
        lr_delta: float = 0.05,
        fusion: Fusion = "permuted",
        incremental_kwargs: dict[str, Any] | None = None,
        train_mb_size: int = 500,
        train_epochs: int = 5,
        eval_mb_size: int | None = 500,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        evaluator: Any = default_evaluator,
        eval_every: int = -1,
        **base_kwargs: Any,
    ):
        if heads_prefix is None:
            heads_prefix = _find_heads_prefix(model)
        source: SpecSource | None = spec
        if heads_prefix is not None:
            source = _with_heads(spec, example_inputs, heads_prefix)
        self.incremental = ReBasinIncremental(
            model,
            spec=source,
            example_inputs=example_inputs,
            alpha=alpha,
            beta=beta,
            lr_perm=lr_perm,
            lr_delta=lr_delta,
            fusion=fusion,
            **(incremental_kwargs or {}),
        )
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=list(plugins) if plugins else None,
            evaluator=evaluator,
            eval_every=eval_every,
            **base_kwargs,
        )
        self.experiences_trained = 0
        self._first_optimizer: torch.optim.Optimizer | None = None

    @property
    def rebasin_active(self) -> bool:
        """Whether the current experience is trained by re-basin (every experience after the first)."""
        return self.incremental.in_episode

    # ------------------------------------------------------------------ experience lifecycle
    def _before_training_exp(self, **kwargs: Any) -> None:
        dataset = getattr(self.experience, "dataset", None)
        if dataset is None or getattr(dataset, "targets", None) is None:
            raise ValueError(
                f"ReBasinStrategy: experience {getattr(self.experience, 'current_experience', '?')} has no "
                "targets (dataset.targets): re-basin incremental learning needs labelled data"
            )
        super()._before_training_exp(**kwargs)
        if self.experiences_trained > 0:
            # the model is theta_{e-1}: learn permutations and residual instead of the weights
            self.incremental.model = self.model
            self.incremental.begin_episode()
            self._first_optimizer = self.optimizer  # type: ignore[has-type]
            self.optimizer = self.incremental.optimizer()  # type: ignore[assignment]

    def forward(self) -> Tensor:
        if not (self.is_training and self.incremental.in_episode):
            return super().forward()
        view = self.incremental.view()
        if isinstance(self.model, MultiTaskModule):
            return view(self.mb_x, self.mb_task_id)
        return view(self.mb_x)

    def criterion(self) -> Tensor:
        loss = super().criterion()
        if self.is_training and self.incremental.in_episode:
            loss = loss + self.incremental.penalty().to(loss.device)
        return loss

    def _after_training_exp(self, **kwargs: Any) -> None:
        if self.incremental.in_episode:
            self.incremental.end_episode()
            if self._first_optimizer is not None:
                self.optimizer = self._first_optimizer  # type: ignore[assignment]
        self.experiences_trained += 1
        super()._after_training_exp(**kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        # Avalanche resets the optimizer at every experience; during a re-basin episode it is the
        # episode's own (restored afterwards), so only reset the user's optimizer.
        if isinstance(self.optimizer, torch.optim.Optimizer):
            super().make_optimizer(**kwargs)


def _find_heads_prefix(model: nn.Module) -> str | None:
    try:
        from avalanche.models import MultiHeadClassifier
    except ImportError:  # pragma: no cover - avalanche is a dependency of this module
        return None
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadClassifier):
            return f"{name}.classifiers." if name else "classifiers."
    return None
