"""Re-basin incremental learning (Procedure 1 of the supplement) for Avalanche: a plugin and a strategy.

:class:`ReBasinPlugin` is an Avalanche ``SupervisedPlugin`` that turns any ``SupervisedTemplate`` strategy
(``Naive``, ``EWC``, ``LwF``, ``Replay``, ...) into re-basin incremental learning: the first experience is
trained by the strategy as usual; in every later experience the strategy trains re-basin permutations plus
a residual (:class:`~rebasin_callbacks.incremental.ReBasinIncremental`) instead of the weights, and the
experience ends with the fusion ``theta_e = (1 - alpha) theta_{e-1} + alpha pi_P(theta_{e-1}) + delta``.
The re-basin quantities of every experience (mean training cost, hidden units the permutations moved,
the residual's norm) are published as Avalanche ``MetricValue``s through the strategy's
``EvaluationPlugin``, so every logger (``InteractiveLogger``, ``TextLogger``, TensorBoard, W&B, CSV) gets
them as ``ReBasin/<quantity>/Exp<k>``.

:class:`ReBasinStrategy` is the convenient form: a ``SupervisedTemplate`` with the plugin first in its
plugin list. Its training budget defaults are Naive's (``train_mb_size=1``, ``train_epochs=1``,
``eval_mb_size=None``); :data:`PAPER_SETTINGS` holds the supplement's (batch 500, 5 epochs).
The authors' released experiment is ``ReBasinStrategy(..., **released_settings(),
plugins=[released_replay(20)], **PAPER_SETTINGS)`` with AdamW for the first experience and inputs
normalised as Avalanche's ``RotatedMNIST`` does (:func:`released_settings`; measured in
``benchmarks/incremental.py``, whose default protocol it is).

A failed or interrupted experience (an exception, Ctrl-C) leaves the last fused model in place; the next
``train()`` or ``eval()`` drops the unfinished episode and gives the strategy back its model and optimizer.

Example:
    >>> import torch
    >>> from avalanche.benchmarks import tensors_benchmark
    >>> from avalanche.training import Naive
    >>> from rebasin_callbacks import PermutationSpec
    >>> from rebasin_callbacks.avalanche import ReBasinPlugin
    >>> xs = [torch.randn(64, 4) for _ in range(2)]
    >>> ys = [torch.randint(0, 3, (64,)) for _ in range(2)]
    >>> bench = tensors_benchmark(list(zip(xs, ys)), list(zip(xs, ys)), task_labels=[0, 0])
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> spec = PermutationSpec.from_axes(
    ...     {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)},
    ...     net.state_dict())
    >>> rebasin = ReBasinPlugin(spec=spec)
    >>> strategy = Naive(model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
    ...                  train_mb_size=32, evaluator=None, plugins=[rebasin])
    >>> for exp in bench.train_stream:
    ...     _ = strategy.train(exp, eval_streams=[])
    >>> rebasin.incremental.episodes_done, sorted(rebasin.incremental.last_episode)
    (1, ['delta_norm', 'moved_fraction', 'units', 'units_moved'])
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from avalanche.models import MultiTaskModule
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from rebasin_callbacks.incremental import (
    RELEASED_SETTINGS,
    Fusion,
    ReBasinIncremental,
    SpecSource,
    check_fraction,
    check_non_negative,
    extend_spec_to_heads,
)
from rebasin_callbacks.settings import SinkhornSettings
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.spec_source import resolve_spec

logger = logging.getLogger(__name__)

__all__ = ["ReBasinPlugin", "ReBasinStrategy", "PAPER_SETTINGS", "released_replay", "released_settings"]

#: The supplement's training budget per experience (batch 500, 5 epochs; evaluation batch 500). Use as
#: ``ReBasinStrategy(..., **PAPER_SETTINGS)``; the strategy's own defaults are Naive's.
PAPER_SETTINGS: dict[str, int] = {"train_mb_size": 500, "train_epochs": 5, "eval_mb_size": 500}


def released_settings(
    lr_perm: float = 0.1, weight_decay: float = 0.1, delta_grad_clip: float | None = 1e-3
) -> dict[str, Any]:
    """Keyword arguments of :class:`ReBasinPlugin` / :class:`ReBasinStrategy` for the authors' released
    code: :data:`~rebasin_callbacks.incremental.RELEASED_SETTINGS` (soft start, residual gradient clamp),
    AdamW for the permutations, SGD weight decay ``weight_decay`` on the residual instead of the penalty
    (``beta = 0``), and their fusion weight 0.8 on ``theta_{e-1}`` (our ``alpha = 0.2``). With
    :func:`released_replay` and :data:`PAPER_SETTINGS` this is their Rotated MNIST experiment.
    ``delta_grad_clip=None`` drops the residual's gradient clamp (not in the supplement): on Rotated MNIST
    it learns each new experience better at the same forgetting (BENCHMARKS.md).

    Example:
        >>> kw = released_settings()
        >>> kw["alpha"], kw["beta"], kw["incremental_kwargs"]["delta_grad_clip"]
        (0.2, 0.0, 0.001)
    """
    lr_perm = check_non_negative("lr_perm", lr_perm)
    weight_decay = check_non_negative("weight_decay", weight_decay)
    if delta_grad_clip is not None:
        delta_grad_clip = check_non_negative("delta_grad_clip", delta_grad_clip)

    def adamw(params: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr_perm)

    return {
        "alpha": 0.2,
        "beta": 0.0,
        "lr_perm": lr_perm,
        "incremental_kwargs": {
            **RELEASED_SETTINGS,
            "delta_grad_clip": delta_grad_clip,
            "delta_weight_decay": weight_decay,
            "perm_optimizer": adamw,
        },
    }


def released_replay(num_experiences: int, per_experience: int = 50) -> SupervisedPlugin:
    """The replay buffer of the authors' released experiment: a fixed ``per_experience`` samples of every
    past experience (``ExperienceBalancedBuffer(per_experience * num_experiences, adaptive_size=False)``).

    Example:
        >>> released_replay(20).mem_size
        1000
    """
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ExperienceBalancedBuffer

    if not (isinstance(num_experiences, int) and num_experiences >= 1):
        raise ValueError(f"num_experiences must be an int >= 1, got {num_experiences!r}")
    if not (isinstance(per_experience, int) and per_experience >= 1):
        raise ValueError(f"per_experience must be an int >= 1, got {per_experience!r}")
    size = per_experience * num_experiences
    policy = ExperienceBalancedBuffer(size, adaptive_size=False, num_experiences=num_experiences)
    return ReplayPlugin(mem_size=size, storage_policy=policy)


def _with_heads(source: SpecSource | None, example_inputs: Any, heads_prefix: str) -> SpecSource:
    """A spec function that builds the base spec, then gives every head the axes of the traced one."""

    def build(model: nn.Module) -> PermutationSpec:
        base = resolve_spec(model, source, example_inputs, purpose="no hidden layer to re-base")
        return extend_spec_to_heads(base, model.state_dict(), heads_prefix)

    return build


class _EpisodeModel(nn.Module):
    """What ``strategy.model`` is during a re-basin experience: the model evaluated at the training state
    ``(theta_{e-1} + pi_P(theta_{e-1})) / 2 + delta``; its parameters are the episode's trainable tensors
    (permutation scores and residuals), so anything that reads ``strategy.model.parameters()`` sees what
    is trained. The user's model is held, not registered: its weights are ``theta_{e-1}``, not trained."""

    base: nn.Module
    _incremental: ReBasinIncremental

    def __init__(self, incremental: ReBasinIncremental):
        super().__init__()
        self.trainable = nn.ParameterList(incremental.trainable_parameters())
        object.__setattr__(self, "_incremental", incremental)
        object.__setattr__(self, "base", incremental.model)
        self.training = incremental.model.training

    def train(self, mode: bool = True) -> _EpisodeModel:
        super().train(mode)
        self.base.train(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._incremental.view()(*args, **kwargs)


class _MultiTaskEpisodeModel(MultiTaskModule):
    """:class:`_EpisodeModel` for task-labelled models (Avalanche passes the task labels)."""

    base: nn.Module
    _incremental: ReBasinIncremental

    def __init__(self, incremental: ReBasinIncremental):
        super().__init__()
        self.trainable = nn.ParameterList(incremental.trainable_parameters())
        object.__setattr__(self, "_incremental", incremental)
        object.__setattr__(self, "base", incremental.model)
        self.known_train_tasks_labels = set(getattr(incremental.model, "known_train_tasks_labels", set()))
        self.training = incremental.model.training

    def train(self, mode: bool = True) -> _MultiTaskEpisodeModel:
        super().train(mode)
        self.base.train(mode)
        return self

    def forward(self, x: Tensor, task_labels: Any) -> Tensor:  # type: ignore[override]
        return self._incremental.view()(x, task_labels)


def _inside_training_of(strategy: Any) -> bool:
    """Whether the call stack is inside ``strategy``'s training loop (periodic evaluation), as opposed to
    a ``train()`` that died earlier and left its state behind."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_train_exp" and frame.f_locals.get("self") is strategy:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class ReBasinPlugin(SupervisedPlugin):
    """Re-basin incremental learning as a plugin for any Avalanche ``SupervisedTemplate`` strategy.

    Put it first in the strategy's ``plugins`` (before ``ReplayPlugin``, and so that EWC/LwF, which the
    strategies add after the user's plugins, see the fused model at experience end). During a re-basin
    experience ``strategy.model`` is the model at the training state and ``strategy.optimizer`` the
    episode's optimizer; both are the user's again after the experience (or after a failure, at the next
    ``train()``/``eval()``). Plugins that act on outputs or data (LwF, replay, A-GEM's memory) act on
    re-basin experiences; weight penalties keyed by parameter name (EWC, SI) skip them, because the
    weights are not what is trained there (they still see every fused model).

    Args:
        model: the model; taken from the strategy at the first ``train()`` when omitted.
        spec: a :class:`~rebasin_callbacks.PermutationSpec` or a function ``model -> spec`` called at
            the start of every re-basin experience; traced from ``example_inputs`` when omitted.
        example_inputs: inputs for tracing the spec (for a ``MultiTaskModule``: ``(x, task_labels)``);
            when both this and ``spec`` are omitted, the first training mini-batch is used (and said so
            in the log).
        heads_prefix: state_dict prefix of the heads of a multi-head model (e.g.
            ``"classifier.classifiers."``): every head gets the axes the spec gives one of them.
            Detected for an ``avalanche.models.MultiHeadClassifier`` when omitted.
        alpha / beta / lr_perm / lr_delta / fusion / settings / incremental_kwargs: passed to
            :class:`~rebasin_callbacks.incremental.ReBasinIncremental` (paper: alpha 0.8, beta 0.1,
            Adam lr 0.1 for the permutations, SGD lr 0.05 for the residual; ``settings`` is the
            relaxation, a :class:`~rebasin_callbacks.SinkhornSettings`).
        log_metrics: publish ``ReBasin/cost``, ``ReBasin/units_moved``, ``ReBasin/moved_fraction`` and
            ``ReBasin/delta_norm`` (suffixed ``/Exp<k>``) through the strategy's EvaluationPlugin.

    Attributes:
        incremental: the :class:`~rebasin_callbacks.incremental.ReBasinIncremental` (``None`` until a model
            is known); ``incremental.last_episode`` holds the last experience's statistics.
        history: one dict per re-basin experience: ``experience`` and the logged quantities.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        spec: SpecSource | None = None,
        example_inputs: Any = None,
        heads_prefix: str | None = None,
        alpha: float = 0.8,
        beta: float = 0.1,
        lr_perm: float = 0.1,
        lr_delta: float = 0.05,
        fusion: Fusion = "permuted",
        settings: SinkhornSettings | None = None,
        incremental_kwargs: dict[str, Any] | None = None,
        log_metrics: bool = True,
    ):
        super().__init__()
        check_fraction("alpha", alpha)
        check_non_negative("beta", beta)
        if settings is not None and not isinstance(settings, SinkhornSettings):
            raise TypeError(f"settings must be a SinkhornSettings, got {type(settings).__name__}")
        self._settings: dict[str, Any] = dict(
            alpha=alpha,
            beta=beta,
            lr_perm=lr_perm,
            lr_delta=lr_delta,
            fusion=fusion,
            **({"settings": settings} if settings is not None else {}),
            **(incremental_kwargs or {}),
        )
        self.spec, self.example_inputs, self.heads_prefix = spec, example_inputs, heads_prefix
        self.log_metrics = log_metrics
        self.incremental: ReBasinIncremental | None = None
        self.experiences_trained = 0
        self.history: list[dict[str, float]] = []
        self._base_model: nn.Module | None = None
        self._user_optimizer: torch.optim.Optimizer | None = None
        self._costs: list[float] = []
        if model is not None and (spec is not None or example_inputs is not None):
            self._build(model)

    def _build(self, model: nn.Module) -> ReBasinIncremental:
        heads_prefix = self.heads_prefix if self.heads_prefix is not None else _find_heads_prefix(model)
        source: SpecSource | None = self.spec
        if heads_prefix is not None:
            source = _with_heads(self.spec, self.example_inputs, heads_prefix)
        self.incremental = ReBasinIncremental(
            model, spec=source, example_inputs=self.example_inputs, **self._settings
        )
        return self.incremental

    @property
    def active(self) -> bool:
        """Whether a re-basin experience is being trained (the strategy's model and optimizer are swapped)."""
        return self._base_model is not None

    def restore(self, strategy: Any) -> None:
        """Drop an unfinished episode and give ``strategy`` back the user's model and optimizer.

        Called automatically at the next ``train()``/``eval()`` after a failed experience."""
        if self._base_model is not None:
            strategy.model = self._base_model
            strategy.model.to(strategy.device)
            strategy.model.train(bool(getattr(strategy, "is_training", True)))
        if self._user_optimizer is not None:
            strategy.optimizer = self._user_optimizer
        if self.incremental is not None and self.incremental.in_episode:
            self.incremental.abort_episode()
        self._base_model, self._user_optimizer, self._costs = None, None, []

    # ------------------------------------------------------------------ Avalanche hooks
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self.restore(strategy)

    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        if self.active and not _inside_training_of(strategy):
            self.restore(strategy)

    def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        # the first hook of an experience: refuse unlabelled data before any plugin touches it
        dataset = getattr(strategy.experience, "dataset", None)
        if dataset is None or getattr(dataset, "targets", None) is None:
            raise ValueError(
                f"ReBasinPlugin: experience {getattr(strategy.experience, 'current_experience', '?')} has "
                "no targets (dataset.targets): re-basin incremental learning needs labelled data"
            )

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        # No spec and no example inputs: trace from the first mini-batch the strategy trains on.
        if self.spec is None and self.example_inputs is None:
            x = strategy.mb_x[:2].detach().clone()
            if isinstance(strategy.model, MultiTaskModule):
                self.example_inputs = (x, strategy.mb_task_id[:2].detach().clone())
            else:
                self.example_inputs = x
            logger.info("ReBasinPlugin: the permutation spec is traced from the first training batch "
                        "(inputs of shape %s)", tuple(x.shape))  # fmt: skip

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.restore(strategy)
        if self.experiences_trained == 0:
            if self.incremental is None and (self.spec is not None or self.example_inputs is not None):
                self._build(strategy.model)
            return
        if self.incremental is None:
            if self.spec is None and self.example_inputs is None:
                raise RuntimeError(
                    "ReBasinPlugin: no spec, no example_inputs and no training batch seen yet: pass spec= or "
                    "example_inputs="
                )
            self._build(strategy.model)
        incremental = self.incremental
        assert incremental is not None
        # the model is theta_{e-1}: learn permutations and residual instead of the weights
        incremental.model = strategy.model
        incremental.begin_episode()
        wrapper_cls = _MultiTaskEpisodeModel if isinstance(strategy.model, MultiTaskModule) else _EpisodeModel
        wrapper = wrapper_cls(incremental)
        self._base_model, self._user_optimizer = strategy.model, strategy.optimizer
        strategy.model = wrapper
        strategy.optimizer = incremental.optimizer()

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.active and self.incremental is not None and self.incremental.beta > 0:
            strategy.loss = strategy.loss + self.incremental.penalty().to(strategy.loss.device)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.active:
            self._costs.append(float(strategy.loss.detach()))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.active:
            assert self.incremental is not None and self._base_model is not None
            strategy.model = self._base_model
            strategy.optimizer = self._user_optimizer
            self._base_model, self._user_optimizer = None, None
            self.incremental.end_episode()
            stats = {
                "cost": sum(self._costs) / len(self._costs) if self._costs else float("nan"),
                **{k: v for k, v in self.incremental.last_episode.items() if k != "units"},
            }
            self._costs = []
            exp_id = int(getattr(strategy.experience, "current_experience", self.experiences_trained))
            self.history.append({"experience": float(exp_id), **stats})
            if self.log_metrics and getattr(strategy, "evaluator", None) is not None:
                x = int(strategy.clock.train_iterations)
                for key, value in stats.items():
                    strategy.evaluator.publish_metric_value(
                        MetricValue(self, f"ReBasin/{key}/Exp{exp_id:03d}", value, x)
                    )
                _PrintOwnMetrics.attach(strategy)
        self.experiences_trained += 1


class _PrintOwnMetrics(SupervisedPlugin):
    """Prints the ``ReBasin/*`` values on the console loggers (``TextLogger``, ``InteractiveLogger``) at the
    end of their own experience.

    The EvaluationPlugin hands them to every logger in ``after_training_exp``, but a text logger prints only
    at its next epoch or evaluation: during the next experience, and never for the last one. This plugin
    runs after the EvaluationPlugin (it is appended to the strategy's plugins, behind it) and prints them."""

    @classmethod
    def attach(cls, strategy: Any) -> None:
        # appended while Avalanche iterates strategy.plugins for this very callback: a list iteration sees
        # the new last element, so it runs for this experience too, after the EvaluationPlugin
        if not any(isinstance(p, cls) for p in strategy.plugins):
            strategy.plugins.append(cls())

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        from avalanche.logging import TextLogger

        for text in getattr(getattr(strategy, "evaluator", None), "loggers", []):
            if not isinstance(text, TextLogger):
                continue
            own = sorted(name for name in text.metric_vals if name.startswith("ReBasin/"))
            for name in own:
                _, _, value = text.metric_vals.pop(name)
                print(f"\t{name} = {value:.4f}" if isinstance(value, float) else f"\t{name} = {value}",
                      file=text.file)  # fmt: skip


class ReBasinStrategy(SupervisedTemplate):
    """Re-basin incremental learning as an Avalanche strategy: a ``SupervisedTemplate`` whose first plugin
    is a :class:`ReBasinPlugin`.

    Args:
        model: the model (a plain ``nn.Module`` or an Avalanche ``MultiTaskModule``).
        optimizer: the optimizer of the first experience, trained normally (paper: Adam, lr 0.001).
        criterion: the task loss (cross entropy by default).
        train_mb_size / train_epochs / eval_mb_size / device / plugins / evaluator / eval_every:
            as for any Avalanche ``SupervisedTemplate``; the defaults are Naive's (batch 1, 1 epoch). The
            supplement's budget: ``**PAPER_SETTINGS`` (batch 500, 5 epochs).
        kwargs: the keywords of :class:`ReBasinPlugin` (``spec``, ``example_inputs``, ``heads_prefix``,
            ``alpha``, ``beta``, ``lr_perm``, ``lr_delta``, ``fusion``, ``settings``,
            ``incremental_kwargs``, ``log_metrics``) go to the plugin; the others to ``SupervisedTemplate``.

    Periodic evaluation inside an experience (``eval_every > 0``) evaluates the model at the current
    training state; the fused model exists only at the end of the experience.

    Example:
        >>> import torch
        >>> from avalanche.benchmarks import tensors_benchmark
        >>> from rebasin_callbacks import PermutationSpec
        >>> xs = [torch.randn(64, 4) for _ in range(2)]
        >>> ys = [torch.randint(0, 3, (64,)) for _ in range(2)]
        >>> bench = tensors_benchmark(list(zip(xs, ys)), list(zip(xs, ys)), task_labels=[0, 0])
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> spec = PermutationSpec.from_axes(
        ...     {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)},
        ...     net.state_dict())
        >>> strategy = ReBasinStrategy(model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        ...                            spec=spec, train_mb_size=32, evaluator=None)
        >>> for exp in bench.train_stream:
        ...     _ = strategy.train(exp, eval_streams=[])
        >>> strategy.incremental.episodes_done
        1
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        evaluator: Any = default_evaluator,
        eval_every: int = -1,
        **kwargs: Any,
    ):
        # The plugin's keywords are declared once, on the plugin: everything it accepts is forwarded to it.
        plugin_keys = set(inspect.signature(ReBasinPlugin.__init__).parameters) - {"self", "model"}
        plugin_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in plugin_keys}
        self.rebasin_plugin = ReBasinPlugin(model, **plugin_kwargs)
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[self.rebasin_plugin, *(plugins or [])],
            evaluator=evaluator,
            eval_every=eval_every,
            **kwargs,
        )

    @property
    def incremental(self) -> ReBasinIncremental:
        """The :class:`~rebasin_callbacks.incremental.ReBasinIncremental` driven by the plugin."""
        if self.rebasin_plugin.incremental is None:
            raise RuntimeError(
                "ReBasinStrategy.incremental is built from the first training batch (no spec or "
                "example_inputs was given): train an experience first"
            )
        return self.rebasin_plugin.incremental

    @property
    def experiences_trained(self) -> int:
        """Experiences finished (the first, trained normally, included)."""
        return self.rebasin_plugin.experiences_trained

    @property
    def rebasin_active(self) -> bool:
        """Whether the current experience is trained by re-basin (every experience after the first)."""
        return self.rebasin_plugin.active


def _with_plugin_keywords(init: Callable[..., None]) -> inspect.Signature:
    """The strategy's signature with :class:`ReBasinPlugin`'s keywords in place of ``**kwargs``: help(),
    IDEs and Avalanche's misspelled-keyword check see them, though they are declared on the plugin only."""
    own = inspect.signature(init).parameters.values()
    plugin = inspect.signature(ReBasinPlugin.__init__).parameters.values()
    params = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [p for p in plugin if p.kind is inspect.Parameter.KEYWORD_ONLY]
    params += [p for p in own if p.kind is inspect.Parameter.VAR_KEYWORD]
    return inspect.Signature(params)


ReBasinStrategy.__init__.__signature__ = _with_plugin_keywords(ReBasinStrategy.__init__)  # type: ignore[attr-defined]


def _find_heads_prefix(model: nn.Module) -> str | None:
    from avalanche.models import MultiHeadClassifier

    for name, module in model.named_modules():
        if isinstance(module, MultiHeadClassifier):
            return f"{name}.classifiers." if name else "classifiers."
    return None
