"""Re-basin incremental learning (Procedure 1 of the supplement), framework-free.

One *episode* learns a new task from the model of the previous episode, ``theta_{e-1}``, without touching
``theta_{e-1}`` itself. Two things are trained:

* permutations ``P`` of the hidden units (a :class:`~rebasin_callbacks.ReBasin`, scores started at the
  identity),
* a residual ``delta`` of the shape of every parameter (started at ``U(0, 1e-6)``),

through the model in the middle of the re-basin line plus the residual::

    theta_i = (theta_{e-1} + pi_P(theta_{e-1})) / 2 + delta        (soft P while training)
    cost    = task_loss(f(x; theta_i), y) + beta * ||delta||^2

At the end of the episode the permutations are projected to hard ones and the models are fused::

    theta_e = (1 - alpha) * theta_{e-1} + alpha * pi_P(theta_{e-1}) + delta     (fusion="permuted")

The supplement prints ``(1 - alpha) theta_{e-1} + alpha theta_{e-1} + delta``, which makes ``alpha`` and
the learned permutations irrelevant to the result; we read it as a typo for ``pi_P(theta_{e-1})`` in the
second term. ``fusion="literal"`` implements the printed formula (``theta_{e-1} + delta``) so the two
readings can be compared (``benchmarks/incremental.py`` runs both).

The authors' released code makes choices the supplement does not print, collected in
:data:`RELEASED_SETTINGS` (pass them as keyword arguments): the permutation scores start at
``I + 0.1 N(0, 1)`` at tau 1 (a near-uniform soft permutation, not the identity) and the residual's
gradient is clamped element-wise to 1e-3. Its fusion weight multiplies ``theta_{e-1}`` (ours multiplies
the permuted model: its ``alpha = 0.8`` is our ``alpha = 0.2``; the supplement's Table 3 is symmetric in
alpha), and its experiment adds Avalanche's ``ReplayPlugin`` with 1,000 samples, which ``ReBasinStrategy``
accepts like any plugin. The defaults stay Procedure 1 as printed, which learns new tasks faster;
the released settings forget far less on Rotated MNIST (``benchmarks/incremental.py``, BENCHMARKS.md).

Buffers (BatchNorm running statistics) get no residual: they are fused with the same formula, and the
training view lets normalisation layers update a private copy, never ``theta_{e-1}``'s.

The class holds no framework code; the Avalanche strategy and the Lightning callback drive it through
:meth:`ReBasinIncremental.begin_episode`, :meth:`~ReBasinIncremental.view`,
:meth:`~ReBasinIncremental.penalty`, :meth:`~ReBasinIncremental.optimizer` and
:meth:`~ReBasinIncremental.end_episode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rebasin_callbacks.permute import permute_state_dict
from rebasin_callbacks.rebasin import PermutedView, ReBasin, apply_soft_permutations
from rebasin_callbacks.seeds import as_generator
from rebasin_callbacks.settings import SinkhornSettings, settings_from
from rebasin_callbacks.spec import AxisEntry, PermutationSpec
from rebasin_callbacks.spec_source import resolve_spec

__all__ = [
    "ReBasinIncremental",
    "RELEASED_SETTINGS",
    "EPISODE_START",
    "JointOptimizer",
    "fuse_states",
    "episode_statistics",
    "extend_spec_to_heads",
    "Fusion",
    "SpecSource",
    "check_fraction",
    "check_non_negative",
]

Fusion = Literal["permuted", "literal"]

#: The settings of the authors' released code that Procedure 1 does not print: scores started at
#: ``I + 0.1 N(0, 1)`` and the residual's gradient clamped to 1e-3. Use as
#: ``ReBasinIncremental(model, spec=spec, **RELEASED_SETTINGS)`` or
#: ``ReBasinStrategy(..., incremental_kwargs=RELEASED_SETTINGS)``.
RELEASED_SETTINGS: dict[str, float] = {"init_scale": 1.0, "init_noise": 0.1, "delta_grad_clip": 1e-3}
#: Procedure 1's relaxation: scores ``10 I`` without jitter, so every episode's soft permutation starts at
#: the identity (the one caller whose start differs from :class:`SinkhornSettings`' defaults, for that reason)
EPISODE_START = SinkhornSettings(init_scale=10.0, init_noise=0.0)
#: a fixed spec, or a function that builds one from the model at the start of every episode (models that
#: grow, such as multi-head classifiers, need the latter)
SpecSource = PermutationSpec | Callable[[nn.Module], PermutationSpec]
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float if it lies in ``[0, 1]``; a ValueError naming ``name`` otherwise."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """``value`` as a float if it is finite and ``>= 0``; a ValueError naming ``name`` otherwise."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def fuse_states(
    base: Mapping[str, Tensor],
    permuted: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    alpha: float,
    fusion: Fusion = "permuted",
) -> dict[str, Tensor]:
    """The end-of-episode model: ``(1 - alpha) base + alpha permuted + delta`` (``fusion="permuted"``) or
    ``base + delta`` (``fusion="literal"``, the formula as printed in the supplement).

    Non-floating entries (e.g. ``num_batches_tracked``) are copied from ``base``; entries absent from
    ``delta`` (buffers) get no residual.

    Example:
        >>> import torch
        >>> a, b, d = {"w": torch.zeros(2)}, {"w": torch.ones(2)}, {"w": torch.full((2,), 0.5)}
        >>> fuse_states(a, b, d, alpha=0.8)["w"]
        tensor([1.3000, 1.3000])
    """
    alpha = check_fraction("alpha", alpha)
    if fusion not in ("permuted", "literal"):
        raise ValueError(f"fusion must be 'permuted' or 'literal', got {fusion!r}")
    out: dict[str, Tensor] = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        if key not in permuted:
            raise KeyError(f"fuse_states: {key!r} is in the base state but not in the permuted state")
        other = permuted[key]
        if other.shape != value.shape:
            raise ValueError(
                f"fuse_states: {key!r} has shape {tuple(value.shape)} but permuted {tuple(other.shape)}"
            )
        fused = value.clone() if fusion == "literal" else torch.lerp(value, other.to(value.dtype), alpha)
        if key in delta:
            fused = fused + delta[key].to(fused.dtype)
        out[key] = fused
    return out


def episode_statistics(perms: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, float]:
    """How far an episode moved the model: hidden units the hard permutations moved, and the residual.

    Returns ``units_moved`` (units not mapped to themselves, over all groups), ``units`` (all units),
    ``moved_fraction`` and ``delta_norm`` (the L2 norm of the whole residual).

    Example:
        >>> import torch
        >>> s = episode_statistics({"H": torch.tensor([1, 0, 2])}, {"w": torch.tensor([3.0, 4.0])})
        >>> s["units_moved"], s["moved_fraction"], s["delta_norm"]
        (2.0, 0.6666666666666666, 5.0)
    """
    moved = sum(int((p.detach().cpu() != torch.arange(p.numel())).sum()) for p in perms.values())
    units = sum(p.numel() for p in perms.values())
    sq = sum(float(d.detach().double().pow(2).sum()) for d in delta.values())
    return {
        "units_moved": float(moved),
        "units": float(units),
        "moved_fraction": moved / units if units else 0.0,
        "delta_norm": math.sqrt(sq),
    }


def extend_spec_to_heads(
    spec: PermutationSpec, state_dict: Mapping[str, Tensor], heads_prefix: str
) -> PermutationSpec:
    """Give every head under ``heads_prefix`` the axes the spec gives one of them.

    A spec traced on a multi-head model with one task's inputs only covers that task's head; the other
    heads read the same permuted features and must be permuted with them, or they break. Keys are
    ``f"{heads_prefix}{head_id}.{suffix}"``; a head's ``suffix`` entry copies the axes of the first head
    with that suffix in the spec.

    Example:
        >>> import torch
        >>> state = {"h.0.weight": torch.zeros(3, 4), "h.1.weight": torch.zeros(3, 4)}
        >>> spec = PermutationSpec.from_axes({"h.0.weight": (None, "P0")}, state)
        >>> extend_spec_to_heads(spec, state, "h.").axes_to_perm["h.1.weight"]
        (None, 'P0')
    """
    template: dict[str, tuple[AxisEntry, ...]] = {}
    for key, axes in spec.axes_to_perm.items():
        if key.startswith(heads_prefix) and "." in key[len(heads_prefix) :]:
            suffix = key[len(heads_prefix) :].split(".", 1)[1]
            template.setdefault(suffix, axes)
    axes_to_perm = dict(spec.axes_to_perm)
    for key in state_dict:
        if key in axes_to_perm or not key.startswith(heads_prefix) or "." not in key[len(heads_prefix) :]:
            continue
        suffix = key[len(heads_prefix) :].split(".", 1)[1]
        if suffix in template:
            axes_to_perm[key] = template[suffix]
    out = PermutationSpec.from_axes(axes_to_perm, state_dict)
    return out


class JointOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (the permutations' and the residual's, each with its own rule).

    A real :class:`torch.optim.Optimizer`, so training loops that insist on one (Lightning, Avalanche)
    accept it: ``param_groups`` are the inner optimizers' own groups (learning-rate schedulers act on
    them), ``step(closure)`` evaluates the closure once and steps every inner optimizer, and the state
    dict holds the inner optimizers' states.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = JointOptimizer(torch.optim.Adam([a], lr=0.1), torch.optim.SGD([b], lr=0.5))
        >>> (a.sum() + b.sum()).backward(); _ = opt.step()
        >>> b.tolist()
        [0.5, 0.5]
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        if not optimizers:
            raise ValueError("JointOptimizer needs at least one optimizer")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"JointOptimizer: argument {i} is a {type(opt).__name__}, not an Optimizer")
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.optimizers = list(optimizers)
        # share the inner group dicts: a change of lr here (a scheduler) is a change there
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"state_dict has {len(states)} optimizers, this JointOptimizer has {len(self.optimizers)}"
            )
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


class ReBasinIncremental:
    """Procedure 1: learn each new episode as re-basin permutations plus a residual, then fuse.

    Args:
        model: the model trained on the first task (``theta_0``). :meth:`end_episode` writes the fused
            model into it; between episodes it always holds the latest ``theta_e``.
        spec: a :class:`PermutationSpec`, or a function ``model -> spec`` called at every episode start
            (for models that grow heads). Traced from ``example_inputs`` when omitted.
        example_inputs: inputs for :func:`~rebasin_callbacks.trace_spec` (traced again every episode).
        alpha: fusion weight of the permuted model, in ``[0, 1]`` (paper: 0.8).
        beta: weight of the residual penalty ``beta * ||delta||^2`` (paper: 0.1).
        lr_perm / lr_delta: learning rates of the default optimizers, Adam for the permutation scores and
            SGD for the residual (paper: 0.1 and 0.05).
        delta_weight_decay: extra SGD weight decay on the residual (0 by default: ``beta`` already is the
            penalty the supplement calls "weight decay").
        perm_optimizer / delta_optimizer: factories ``params -> optimizer`` replacing the defaults.
        fusion: ``"permuted"`` (default, see the module docstring) or ``"literal"``.
        settings: the relaxation (:class:`~rebasin_callbacks.SinkhornSettings`); by default
            :data:`EPISODE_START`: the initial scores are ``init_scale * I + init_noise * N(0, 1)`` with
            10 and 0, so the soft permutation itself starts at the identity, as Procedure 1 says;
            :data:`RELEASED_SETTINGS` (1 and 0.1 at ``tau = 1``) start from an identity-centred score
            matrix whose soft permutation is near-uniform for wide layers, as the authors' code does.
        tau / n_iters / tol / init_scale / init_noise: set one field of ``settings`` (given ones win).
        delta_init: residuals start at ``U(0, delta_init)`` (paper: 1e-6).
        delta_grad_clip: clamp every element of the residual's gradient to ``[-c, c]`` before the
            optimizer sees it (default ``None``: no clamp; the authors' code uses 1e-3). Done with tensor
            hooks, so it applies in any training loop.
        seed: an int or a ``torch.Generator`` for the residual initialisation and the scores' jitter.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import PermutationSpec
        >>> from rebasin_callbacks.incremental import ReBasinIncremental
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> spec = PermutationSpec.from_axes(
        ...     {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)},
        ...     net.state_dict())
        >>> inc = ReBasinIncremental(net, spec=spec, alpha=0.8, beta=0.1)
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))] * 3
        >>> history = inc.fit_episode(data, torch.nn.functional.cross_entropy, epochs=2)
        >>> len(history["loss"]), inc.episodes_done
        (6, 1)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: SpecSource | None = None,
        example_inputs: Any = None,
        alpha: float = 0.8,
        beta: float = 0.1,
        lr_perm: float = 0.1,
        lr_delta: float = 0.05,
        delta_weight_decay: float = 0.0,
        perm_optimizer: OptimizerFactory | None = None,
        delta_optimizer: OptimizerFactory | None = None,
        fusion: Fusion = "permuted",
        settings: SinkhornSettings | None = None,
        tau: float | None = None,
        n_iters: int | None = None,
        tol: float | None = None,
        init_scale: float | None = None,
        init_noise: float | None = None,
        delta_init: float = 1e-6,
        delta_grad_clip: float | None = None,
        seed: int | torch.Generator | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if spec is None and example_inputs is None:
            raise ValueError("ReBasinIncremental needs spec= or example_inputs= (to trace a spec from)")
        if spec is not None and not (isinstance(spec, PermutationSpec) or callable(spec)):
            raise TypeError(
                f"spec must be a PermutationSpec or a callable model -> spec, got {type(spec).__name__}"
            )
        if fusion not in ("permuted", "literal"):
            raise ValueError(f"fusion must be 'permuted' or 'literal', got {fusion!r}")
        self.settings = settings_from(
            settings, EPISODE_START, tau=tau, n_iters=n_iters, tol=tol, init_scale=init_scale,
            init_noise=init_noise, seed=seed,
        )  # fmt: skip
        self.model = model
        self.spec_source = spec
        self.example_inputs = example_inputs
        self.alpha = check_fraction("alpha", alpha)
        self.beta = check_non_negative("beta", beta)
        self.lr_perm = check_non_negative("lr_perm", lr_perm)
        self.lr_delta = check_non_negative("lr_delta", lr_delta)
        self.delta_weight_decay = check_non_negative("delta_weight_decay", delta_weight_decay)
        self.delta_init = check_non_negative("delta_init", delta_init)
        self.delta_grad_clip = (
            None if delta_grad_clip is None else check_non_negative("delta_grad_clip", delta_grad_clip)
        )
        self.perm_optimizer_factory = perm_optimizer
        self.delta_optimizer_factory = delta_optimizer
        self.fusion: Fusion = fusion
        # one generator draws the residuals and the scores' jitter, episode after episode
        self.generator = as_generator(self.settings.seed)
        self.episodes_done = 0
        self.spec: PermutationSpec | None = None
        self.rebasin: ReBasin | None = None
        self.delta: dict[str, nn.Parameter] = {}
        self._optimizer: JointOptimizer | None = None
        self._buffers: dict[str, Tensor] = {}
        #: statistics of the last finished episode (:func:`episode_statistics`); empty before the first
        self.last_episode: dict[str, float] = {}
        # Fail at construction, not at the first re-basin episode, when the model cannot be permuted.
        if isinstance(spec, PermutationSpec) or spec is None:
            self._make_spec()

    # ------------------------------------------------------------------ episode lifecycle
    @property
    def in_episode(self) -> bool:
        """Whether :meth:`begin_episode` was called and :meth:`end_episode` not yet."""
        return self.rebasin is not None

    def _make_spec(self) -> PermutationSpec:
        return resolve_spec(
            self.model,
            self.spec_source,
            self.example_inputs,
            purpose="re-basin incremental learning needs at least one permutable hidden layer",
        )

    def begin_episode(self) -> None:
        """Start an episode from the model's current weights: identity permutations, tiny residual."""
        if self.in_episode:
            raise RuntimeError("begin_episode() called twice without end_episode()")
        spec = self._make_spec()
        self.spec = spec
        self.rebasin = ReBasin(self.model, spec, init="identity", settings=self.settings, seed=self.generator)
        self.delta = {}
        for name, p in self.model.named_parameters():
            noise = torch.rand(p.shape, generator=self.generator, dtype=torch.float32) * self.delta_init
            delta = nn.Parameter(noise.to(device=p.device, dtype=p.dtype))
            if self.delta_grad_clip is not None:
                clip = self.delta_grad_clip
                delta.register_hook(lambda g, c=clip: g.clamp(-c, c))
            self.delta[name] = delta
        self._buffers = {
            name: b.detach().clone() for name, b in self.model.named_buffers() if b.is_floating_point()
        }
        perm_params: list[Tensor] = list(self.rebasin.parameters())
        delta_params: list[Tensor] = list(self.delta.values())
        opt_p = (
            self.perm_optimizer_factory(perm_params)
            if self.perm_optimizer_factory
            else torch.optim.Adam(perm_params, lr=self.lr_perm)
        )
        opt_d = (
            self.delta_optimizer_factory(delta_params)
            if self.delta_optimizer_factory
            else torch.optim.SGD(delta_params, lr=self.lr_delta, weight_decay=self.delta_weight_decay)
        )
        self._optimizer = JointOptimizer(opt_p, opt_d)

    def _require_episode(self, what: str) -> ReBasin:
        if self.rebasin is None:
            raise RuntimeError(f"{what} needs an active episode: call begin_episode() first")
        return self.rebasin

    def optimizer(self) -> JointOptimizer:
        """The episode's optimizer over the permutation scores and the residual."""
        self._require_episode("optimizer()")
        assert self._optimizer is not None
        return self._optimizer

    def trainable_parameters(self) -> list[Tensor]:
        """The tensors trained in this episode: permutation scores, then residuals."""
        rb = self._require_episode("trainable_parameters()")
        return [*rb.parameters(), *self.delta.values()]

    def training_state(self) -> dict[str, Tensor]:
        """``(theta_{e-1} + pi_P(theta_{e-1})) / 2 + delta`` with the current soft permutations."""
        rb = self._require_episode("training_state()")
        base = rb.base_state()
        permuted = apply_soft_permutations(base, rb.spec, rb.soft_permutations())
        state: dict[str, Tensor] = {}
        for key, value in base.items():
            if key in self.delta:
                state[key] = (value + permuted[key]) / 2 + self.delta[key]
            elif key in self._buffers:
                # normalisation layers update running statistics in place: give them a private copy
                self._buffers[key].copy_(((value + permuted[key]) / 2).detach())
                state[key] = self._buffers[key]
            else:
                state[key] = value
        return state

    def view(self) -> PermutedView:
        """The model being trained, as a callable (``functional_call`` on the model's structure).

        Build it once per training step: it runs Sinkhorn for every group."""
        return PermutedView(self.model, self.training_state())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluate the model being trained on a batch (same as ``view()(*args, **kwargs)``)."""
        return self.view()(*args, **kwargs)

    __call__ = forward

    def penalty(self) -> Tensor:
        """``beta * ||delta||^2`` (a scalar on the model's device)."""
        self._require_episode("penalty()")
        deltas = list(self.delta.values())
        if not deltas:
            return torch.zeros(())
        total = deltas[0].pow(2).sum()
        for d in deltas[1:]:
            total = total + d.pow(2).sum().to(total.device)
        return self.beta * total

    def loss(self, outputs: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """Procedure 1's cost: ``loss_fn(outputs, targets) + beta * ||delta||^2``."""
        return loss_fn(outputs, targets) + self.penalty().to(outputs.device)

    def step(self, batch: Any, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> float:
        """One optimisation step on ``batch = (inputs, targets)``; returns the cost."""
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise ValueError(
                f"step() needs a batch (inputs, targets[, ...]); got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        x, y = batch[0], batch[1]
        opt = self.optimizer()
        device = next(iter(self.delta.values())).device if self.delta else torch.device("cpu")
        x, y = _to(x, device), _to(y, device)
        opt.zero_grad()
        cost = self.loss(self.forward(x), y, loss_fn)
        cost.backward()
        opt.step()
        return float(cost.detach())

    @torch.no_grad()
    def end_episode(self) -> dict[str, Tensor]:
        """Project the permutations, fuse, write ``theta_e`` into the model and return its state dict."""
        rb = self._require_episode("end_episode()")
        base = rb.base_state()
        perms = rb.project()
        permuted = permute_state_dict(base, rb.spec, perms)
        delta = {k: d.detach() for k, d in self.delta.items()}
        fused = fuse_states(base, permuted, delta, self.alpha, self.fusion)
        self.model.load_state_dict(fused)
        self.last_episode = episode_statistics(perms, delta)
        self.rebasin, self._optimizer, self.delta, self._buffers = None, None, {}, {}
        self.episodes_done += 1
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def fit_episode(
        self,
        data: Iterable[Any],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        epochs: int = 5,
    ) -> dict[str, list[float]]:
        """Run a whole episode on ``data`` (an iterable of ``(inputs, targets)`` batches, re-iterated every
        epoch, e.g. a DataLoader) and fuse. Returns ``{"loss": [cost per step]}``."""
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        self.begin_episode()
        was_training = self.model.training
        self.model.train()
        history: list[float] = []
        try:
            for _ in range(epochs):
                for batch in data:
                    history.append(self.step(batch, loss_fn))
        except BaseException:
            self.abort_episode()
            self.model.train(was_training)
            raise
        self.end_episode()
        self.model.train(was_training)
        return {"loss": history}

    def abort_episode(self) -> None:
        """Drop the active episode without changing the model."""
        self.rebasin, self._optimizer, self.delta, self._buffers = None, None, {}, {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and progress (between episodes; an active episode is not saved)."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "fusion": self.fusion,
            "episodes_done": self.episodes_done,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = check_fraction("alpha", state["alpha"])
        self.beta = check_non_negative("beta", state["beta"])
        if state["fusion"] not in ("permuted", "literal"):
            raise ValueError(f"fusion must be 'permuted' or 'literal', got {state['fusion']!r}")
        self.fusion = state["fusion"]
        self.episodes_done = int(state["episodes_done"])


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value
