"""Re-basin incremental learning (Procedure 1) against Avalanche's baselines on Rotated MNIST.

Two protocols (``--protocol``):

* ``authors`` (default; the paper's row): the authors' released experiment. Full MNIST (torchvision files
  under ``$REBASIN_DATA``, or ``--download``; the 5,000-image offline subset is used, with a warning,
  when neither is there), Avalanche ``RotatedMNIST`` preprocessing (nearest-neighbour rotation,
  normalisation with mean 0.1307 / std 0.3081), 20 experiences rotated counter-clockwise by
  ``linspace(0, 180, 20)`` degrees, MLP 784-256-10. Re-basin: the released settings
  (:data:`~rebasin_callbacks.incremental.RELEASED_SETTINGS`, AdamW for P and for the first task, SGD with
  weight decay for the residual, their fusion weight 0.8 = our ``alpha`` 0.2) with a fixed 50 samples per
  past experience (``ExperienceBalancedBuffer(1000, adaptive_size=False, num_experiences=20)``), batch
  500, 5 epochs of 60,000 images = 600 steps per experience (``--steps`` uses ``100 * steps`` images per
  experience, e.g. ``--steps 120`` for a fifth of the budget). The authors' baselines in the same run:
  Finetune, EWC, LwF, A-GEM (SGD, batch 10, 5 epochs over the same images) and Joint training on all
  experiences (upper bound); context rows: Naive, SI and Replay with the re-basin row's optimiser, batch
  and buffer.
* ``quick``: the offline 5,000-image subset, clockwise 9.47-degree steps, no normalisation, the
  supplement's hyper-parameters (Adam), an alpha x beta grid with both fusion readings, Naive, EWC, LwF,
  SI and Replay(1000) (minutes on a laptop).

Metrics, after every experience on every task seen so far (``acc[e][t]``: accuracy on task ``t`` after
experience ``e``; ``n`` experiences):

* accuracy = mean over all tasks of the final model's accuracy;
* forgetting (Avalanche) = Avalanche's ``StreamForgetting``: mean over tasks ``t < n - 1`` of
  ``acc[t][t] - acc[n-1][t]`` (accuracy right after the task's own experience minus final accuracy);
* forgetting (supplement) = the supplement's wording: mean over ``t < n - 1`` of
  ``max_{t <= e < n-1} acc[e][t] - acc[n-1][t]`` (never smaller than Avalanche's);
* plasticity = mean over tasks of ``acc[t][t]`` (how well each experience is learnt).

``--seeds 0 1 2`` repeats everything and reports mean and spread (population std).

Split CIFAR-100 (``--benchmark split-cifar100``): 20 tasks of 5 classes, a multi-head ResNet18 (torchvision,
3x3 stem, one head per task), task-incremental. Needs torchvision's CIFAR-100 on disk or ``--download``;
``--synthetic`` runs the same pipeline on random tensors of the same shape (a plumbing check only).

Usage::

    python benchmarks/incremental.py --seeds 0 1 2 --out benchmarks/results/incremental_authors
    python benchmarks/incremental.py --steps 120 --methods rebasin finetune replay   # reduced check
    python benchmarks/incremental.py --protocol quick --out benchmarks/results/incremental
    python benchmarks/incremental.py --smoke             # a few episodes, a seconds-long check
    python benchmarks/incremental.py --benchmark split-cifar100 --synthetic --smoke
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rebasin_callbacks.spec import PermutationSpec

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Stream:
    """Per-task train and test tensors ``(x, y)`` and task labels."""

    train: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]
    task_labels: list[int]
    source: str


def rotated_mnist(episodes: int, step_deg: float, seed: int, download: bool) -> Stream:
    from rebasin_callbacks.data import mnist, rotated

    train, test = mnist(True, download=download, seed=seed), mnist(False, download=download, seed=seed)
    tr, te = [], []
    for e in range(episodes):
        # the supplement rotates clockwise; rotated() turns counter-clockwise, hence the minus sign
        a, b = rotated(train, -step_deg * e), rotated(test, -step_deg * e)
        tr.append((a.tensors[0].flatten(1), a.tensors[1]))
        te.append((b.tensors[0].flatten(1), b.tensors[1]))
    return Stream(tr, te, [0] * episodes, getattr(train, "source", "?"))


def split_cifar100(
    episodes: int, seed: int, download: bool, synthetic: bool, per_class: int | None
) -> Stream:
    g = torch.Generator().manual_seed(seed)
    if synthetic:
        n_tr, n_te = per_class or 4, 2
        x_tr = torch.rand(100 * n_tr, 3, 32, 32, generator=g)
        y_tr = torch.arange(100).repeat_interleave(n_tr)
        x_te = torch.rand(100 * n_te, 3, 32, 32, generator=g)
        y_te = torch.arange(100).repeat_interleave(n_te)
        source = "synthetic"
    else:
        from torchvision.datasets import CIFAR100

        root = str(Path.home() / ".cache" / "rebasin_callbacks" / "data")
        sets = [CIFAR100(root, train=t, download=download) for t in (True, False)]
        mean = torch.tensor([0.507, 0.487, 0.441]).view(1, 3, 1, 1)
        std = torch.tensor([0.267, 0.256, 0.276]).view(1, 3, 1, 1)
        (x_tr, y_tr), (x_te, y_te) = [
            (
                (torch.as_tensor(s.data).permute(0, 3, 1, 2).float() / 255 - mean) / std,
                torch.as_tensor(s.targets),
            )
            for s in sets
        ]
        source = "torchvision"
    order = torch.randperm(100, generator=g)
    tr, te = [], []
    for t in range(episodes):
        classes = order[5 * t : 5 * t + 5]
        for xs, ys, out in ((x_tr, y_tr, tr), (x_te, y_te, te)):
            mask = torch.isin(ys, classes)
            local = (ys[mask].unsqueeze(1) == classes.unsqueeze(0)).float().argmax(1)  # labels 0..4
            if per_class is not None and out is tr:
                keep = torch.cat([torch.nonzero(local == c).flatten()[:per_class] for c in range(5)])
                out.append((xs[mask][keep], local[keep]))
            else:
                out.append((xs[mask], local))
    return Stream(tr, te, list(range(episodes)), source)


# ---------------------------------------------------------------------------------------------- models
def make_mlp() -> tuple[nn.Module, PermutationSpec]:
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    axes = {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)}
    return net, PermutationSpec.from_axes(axes, net.state_dict())


def make_multihead_resnet18() -> tuple[nn.Module, Callable[[nn.Module], PermutationSpec]]:
    """torchvision resnet18 with a 3x3 stem (32x32 inputs) and one 5-way head per task."""
    import torchvision
    from avalanche.models import MultiHeadClassifier, MultiTaskModule

    from rebasin_callbacks.trace import trace_spec

    class MultiHeadResNet18(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__()
            net = torchvision.models.resnet18(num_classes=5)
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
            net.fc = nn.Identity()
            self.backbone = net
            self.classifier = MultiHeadClassifier(512, 5, masking=False)

        def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
            return self.classifier(self.backbone(x), task_label)

    model = MultiHeadResNet18()
    # trace the backbone with a linear head (a network's raw output is never permuted); its axes then go
    # to every task head
    probe = torchvision.models.resnet18(num_classes=5)
    probe.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    probe.maxpool = nn.Identity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = trace_spec(probe, torch.randn(2, 3, 32, 32))

    def spec_fn(m: nn.Module) -> PermutationSpec:
        state = m.state_dict()
        axes: dict[str, tuple[str | None, ...]] = {}
        for key, ax in template.axes_to_perm.items():
            if key.startswith("fc."):
                for head in m.classifier.classifiers:  # type: ignore[union-attr]
                    axes[f"classifier.classifiers.{head}.classifier.{key[3:]}"] = ax
            else:
                axes[f"backbone.{key}"] = ax
        return PermutationSpec.from_axes(axes, state)

    return model, spec_fn


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    name: str
    acc_matrix: list[list[float]] = field(default_factory=list)  # [after episode e][task t]
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        final = self.acc_matrix[-1]
        return sum(final) / len(final)

    @property
    def forgetting(self) -> float:
        """The supplement's (max-based): best accuracy on a task before the end minus its final accuracy."""
        n = len(self.acc_matrix)
        if n < 2:
            return float("nan")
        drops = [
            max(self.acc_matrix[e][t] for e in range(t, n - 1)) - self.acc_matrix[-1][t] for t in range(n - 1)
        ]
        return sum(drops) / len(drops)

    @property
    def forgetting_avalanche(self) -> float:
        """Avalanche's StreamForgetting: accuracy right after a task's own experience minus final accuracy."""
        n = len(self.acc_matrix)
        if n < 2:
            return float("nan")
        drops = [self.acc_matrix[t][t] - self.acc_matrix[-1][t] for t in range(n - 1)]
        return sum(drops) / len(drops)

    @property
    def plasticity(self) -> float:
        """Mean accuracy on each task right after its own experience."""
        n = len(self.acc_matrix)
        if n < 2:
            return float("nan")
        return sum(self.acc_matrix[t][t] for t in range(n)) / n


@torch.no_grad()
def evaluate(
    model: nn.Module, stream: Stream, device: torch.device, batch: int = 1000, upto: int | None = None
) -> list[float]:
    """Accuracy on every task's test set (tasks after ``upto`` are NaN when it is given)."""
    from avalanche.models import MultiTaskModule

    model.eval()
    accs = []
    for i, ((x, y), t) in enumerate(zip(stream.test, stream.task_labels)):
        if upto is not None and i > upto:
            accs.append(float("nan"))
            continue
        if isinstance(model, MultiTaskModule) and t not in model.known_train_tasks_labels:
            accs.append(float("nan"))  # a multi-head model has no head for a task it has not met yet
            continue
        correct = 0
        for i in range(0, len(y), batch):
            xb = x[i : i + batch].to(device)
            out = (
                model(xb, torch.full((len(xb),), t, device=device))
                if isinstance(model, MultiTaskModule)
                else model(xb)
            )
            correct += int((out.argmax(1).cpu() == y[i : i + batch]).sum())
        accs.append(correct / len(y))
    model.train()
    return accs


def run_strategy(
    name: str,
    make_strategy: Callable[[nn.Module], Any],
    model: nn.Module,
    stream: Stream,
    device: torch.device,
    log: Callable[[str], None],
    seen_only: bool = False,
) -> tuple[RunResult, Any]:
    from avalanche.benchmarks import tensors_benchmark

    bench = tensors_benchmark(stream.train, stream.test, task_labels=stream.task_labels)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        strategy = make_strategy(model)
    result = RunResult(name)
    start = time.perf_counter()
    for e, exp in enumerate(bench.train_stream):
        with warnings.catch_warnings():
            # Avalanche 0.6's own ReplayPlugin calls a method it deprecates, once per experience
            warnings.filterwarnings("ignore", category=DeprecationWarning, message="Call to deprecated")
            strategy.train(exp, eval_streams=[])
        result.acc_matrix.append(evaluate(model, stream, device, upto=e if seen_only else None))
        seen = result.acc_matrix[-1][: e + 1]
        log(f"  {name} episode {e + 1}: current {seen[-1]:.3f}, mean over seen {sum(seen) / len(seen):.3f}")
    result.seconds = time.perf_counter() - start
    return result, strategy


def recipe(
    name: str, alpha: float, beta: float, lr_perm: float, lr_delta: float, override: dict[str, float | None]
) -> dict[str, Any]:
    """ReBasinStrategy arguments for a recipe.

    * ``procedure``: Procedure 1 as printed: permutations start at the identity (soft P = I), the cost is
      ``loss + beta ||delta||^2``, Adam for P, SGD for delta.
    * ``released``: the settings of the authors' released code: scores ``I + 0.1 N(0, 1)`` at tau 1 (a
      near-uniform soft P for a 256-unit layer), AdamW for P, SGD with weight decay ``beta`` for delta and
      no penalty term, the residual's gradient clamped to 1e-3 element-wise.
    * ``paper`` (the authors' protocol's default): ``released`` without the residual's gradient clamp,
      which the supplement does not print; with it each new experience is learnt measurably worse
      (BENCHMARKS.md).
    """
    kwargs: dict[str, Any] = dict(alpha=alpha, lr_perm=lr_perm, lr_delta=lr_delta)
    if name == "procedure":
        out = {
            **kwargs,
            "beta": beta,
            "incremental_kwargs": dict(init_scale=10.0, init_noise=0.0, delta_grad_clip=None),
        }
    elif name in ("released", "paper"):
        from rebasin_callbacks.avalanche import released_settings

        clip = {"delta_grad_clip": None} if name == "paper" else {}
        out = {
            **released_settings(lr_perm=lr_perm, weight_decay=beta, **clip),
            "alpha": alpha,
            "lr_delta": lr_delta,
        }
    else:
        raise ValueError(f"unknown recipe {name!r}")
    out["incremental_kwargs"].update(override)
    return out


def _strategy_kwargs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The settings every strategy of a run shares: loss, the run's batch and epochs, the device."""
    return dict(
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=args.batch,
        train_epochs=args.epochs,
        eval_mb_size=1000,
        device=device,
        evaluator=None,
    )


def strategies(
    args: argparse.Namespace, spec: Any, device: torch.device
) -> dict[str, Callable[[nn.Module], Any]]:
    """name -> factory(model) -> Avalanche strategy; all share the first-task optimiser and schedule."""
    from avalanche.training import EWC, LwF, Naive, Replay, SynapticIntelligence

    from rebasin_callbacks.avalanche import ReBasinStrategy

    common = _strategy_kwargs(args, device)

    def adam(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=args.lr)

    def replay_plugins(mem: int) -> list[Any]:
        from avalanche.training.plugins import ReplayPlugin

        return [ReplayPlugin(mem_size=mem)] if mem > 0 else []

    out: dict[str, Callable[[nn.Module], Any]] = {}
    for mem in args.rebasin_replay:
        tag = f",replay={mem}" if mem > 0 else ""
        for fusion in args.fusions:
            for beta in args.betas:
                # the literal reading ignores alpha: one run per beta
                for alpha in args.alphas if fusion == "permuted" else [args.alphas[-1]]:
                    name = f"rebasin[{args.recipe},{fusion},a={alpha:g},b={beta:g}{tag}]"
                    out[name] = lambda m, a=alpha, b=beta, f=fusion, r=mem: ReBasinStrategy(
                        model=m,
                        optimizer=adam(m),
                        spec=spec,
                        fusion=f,
                        plugins=replay_plugins(r),
                        **recipe(args.recipe, a, b, args.lr_perm, args.lr_delta, args.override),
                        **common,
                    )
    factories = {
        "naive": lambda m: Naive(model=m, optimizer=adam(m), **common),
        "ewc": lambda m: EWC(model=m, optimizer=adam(m), ewc_lambda=args.ewc_lambda, **common),
        "lwf": lambda m: LwF(model=m, optimizer=adam(m), alpha=args.lwf_alpha, temperature=2.0, **common),
        "si": lambda m: SynapticIntelligence(model=m, optimizer=adam(m), si_lambda=args.si_lambda, **common),
        "replay": lambda m: Replay(model=m, optimizer=adam(m), mem_size=args.replay_mem, **common),
    }
    for name in args.baselines:
        out[name] = factories[name]
    return out


# ---------------------------------------------------------------------------------------------- authors
AUTHORS_METHODS = ["rebasin", "finetune", "ewc", "lwf", "agem", "joint", "naive", "si", "replay"]
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MNISTNormalize(nn.Module):
    """uint8 pixels -> Avalanche's RotatedMNIST input (``ToTensor`` then ``Normalize(0.1307, 0.3081)``).

    Inside the model so the rotated experiences are kept as uint8 (a quarter of the memory)."""

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - MNIST_MEAN) / MNIST_STD


def make_authors_mlp() -> tuple[nn.Module, PermutationSpec]:
    net = nn.Sequential(MNISTNormalize(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    axes = {"1.weight": ("H", None), "1.bias": ("H",), "3.weight": (None, "H"), "3.bias": (None,)}
    return net, PermutationSpec.from_axes(axes, net.state_dict())


def authors_rotated_mnist(
    episodes: int,
    images_per_episode: int | None,
    seed: int,
    download: bool,
    log: Callable[[str], None],
    test_images: int | None = None,
) -> Stream:
    """Avalanche ``RotatedMNIST(n_experiences, rotations_list=linspace(0, 180, n))``: every experience is
    the training set rotated counter-clockwise (nearest neighbour, torchvision's ``RandomRotation``
    default), test sets likewise. ``images_per_episode`` draws that many training images per experience
    (a seeded subset; ``None``: all)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import rotate

    from rebasin_callbacks.data import mnist

    train, test = mnist(True, download=download, seed=seed), mnist(False, download=download, seed=seed)
    source = getattr(train, "source", "?")
    if source != "torchvision":
        warnings.warn(
            "full MNIST not found (set REBASIN_DATA to a torchvision MNIST folder or pass --download): "
            "running the authors' protocol on the 5,000-image offline subset",
            stacklevel=2,
        )

    def as_uint8(ds: Any) -> tuple[Tensor, Tensor]:
        x = ds.tensors[0].reshape(-1, 1, 28, 28)
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8), ds.tensors[1]

    (x_tr, y_tr), (x_te, y_te) = as_uint8(train), as_uint8(test)
    if test_images is not None:  # the same test images in every rotation
        x_te, y_te = x_te[:test_images], y_te[:test_images]
    angles = torch.linspace(0.0, 180.0, episodes).tolist() if episodes > 1 else [0.0]
    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for angle in angles:
        idx = torch.arange(len(y_tr))
        if images_per_episode is not None and images_per_episode < len(y_tr):
            idx = torch.randperm(len(y_tr), generator=g)[:images_per_episode]
        for xs, ys, out in ((x_tr[idx], y_tr[idx], tr), (x_te, y_te, te)):
            rot = torch.cat(
                [
                    rotate(xs[i : i + 10000], angle, interpolation=InterpolationMode.NEAREST)
                    for i in range(0, len(xs), 10000)
                ]
            )
            out.append((rot.flatten(1).contiguous(), ys.clone()))
    log(f"angles: {', '.join(f'{a:.1f}' for a in angles)}")
    return Stream(tr, te, [0] * episodes, source)


#: The baselines as the authors' released scripts run them (one script per method, SGD, Avalanche's
#: strategies); ``epochs`` count passes over the experience's images, as ``train_epochs`` does.
AUTHORS_BASELINES: dict[str, dict[str, float]] = {
    # finetune.py: plain SGD on each experience in turn
    "finetune": {"lr": 0.01, "batch": 10, "epochs": 5},
    # ewc.py: ewc_lambda 100, mode "separate"
    "ewc": {"lr": 0.01, "batch": 10, "epochs": 5, "ewc_lambda": 100.0},
    # lwf.py: a ten times smaller lr than Finetune, distillation alpha 1 at temperature 0.5
    "lwf": {"lr": 0.001, "batch": 10, "epochs": 5, "alpha": 1.0, "temperature": 0.5},
    # agem.py: 5 samples per class per experience in memory and as the reference batch, 10 epochs
    "agem": {"lr": 0.001, "batch": 10, "epochs": 10, "patterns_per_exp": 50, "sample_size": 50},
    # joint.py: the upper bound, every experience at once, 50 epochs at batch 500 and lr 0.1
    "joint": {"lr": 0.1, "batch": 500, "epochs": 50},
}


def authors_strategies(
    args: argparse.Namespace, spec: PermutationSpec, device: torch.device, episodes: int
) -> dict[str, Callable[[nn.Module], Any]]:
    """name -> factory(model) -> Avalanche strategy, as the authors' experiment runs them
    (:data:`AUTHORS_BASELINES`; ``--baseline-epochs`` overrides every baseline's epochs)."""
    from avalanche.training import AGEM, EWC, JointTraining, LwF, Naive, SynapticIntelligence

    from rebasin_callbacks.avalanche import ReBasinStrategy, released_replay

    big = _strategy_kwargs(args, device)

    def sgd(name: str) -> Callable[[nn.Module], dict[str, Any]]:
        cfg = AUTHORS_BASELINES[name]
        epochs = args.baseline_epochs if args.baseline_epochs is not None else int(cfg["epochs"])

        def kwargs(m: nn.Module) -> dict[str, Any]:
            opt = torch.optim.SGD(m.parameters(), lr=cfg["lr"])
            return {
                **big,
                "model": m,
                "optimizer": opt,
                "train_mb_size": int(cfg["batch"]),
                "train_epochs": epochs,
            }

        return kwargs

    def adamw(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=args.lr)

    def buffer() -> list[Any]:
        return [released_replay(episodes, args.per_experience)] if args.per_experience > 0 else []

    alpha = args.alphas[0] if args.alphas else 0.2
    beta = args.betas[0] if args.betas else 0.1
    cfg = AUTHORS_BASELINES
    factories: dict[str, Callable[[nn.Module], Any]] = {
        "rebasin": lambda m: ReBasinStrategy(
            model=m,
            optimizer=adamw(m),
            spec=spec,
            plugins=buffer(),
            **recipe(args.recipe, alpha, beta, args.lr_perm, args.lr_delta, args.override),
            **big,
        ),
        "finetune": lambda m: Naive(**sgd("finetune")(m)),
        "ewc": lambda m: EWC(ewc_lambda=cfg["ewc"]["ewc_lambda"], mode="separate", **sgd("ewc")(m)),
        "lwf": lambda m: LwF(
            alpha=cfg["lwf"]["alpha"], temperature=cfg["lwf"]["temperature"], **sgd("lwf")(m)
        ),
        "agem": lambda m: AGEM(
            patterns_per_exp=int(cfg["agem"]["patterns_per_exp"]),
            sample_size=int(cfg["agem"]["sample_size"]),
            **sgd("agem")(m),
        ),
        "joint": lambda m: JointTraining(**sgd("joint")(m)),
        "naive": lambda m: Naive(model=m, optimizer=adamw(m), **big),
        "si": lambda m: SynapticIntelligence(model=m, optimizer=adamw(m), si_lambda=args.si_lambda, **big),
        "replay": lambda m: Naive(model=m, optimizer=adamw(m), plugins=buffer(), **big),
    }
    return {name: factories[name] for name in args.methods}


AUTHORS_LABELS = {
    "rebasin": "re-basin (released settings without the residual clamp, fixed 50/exp buffer, AdamW, batch 500)",
    "finetune": "Finetune (SGD lr 0.01, batch 10)",
    "ewc": "EWC (SGD lr 0.01, batch 10, lambda 100)",
    "lwf": "LwF (SGD lr 0.001, batch 10, alpha 1, T 0.5)",
    "agem": "A-GEM (SGD lr 0.001, batch 10, 10 epochs, 50 per experience)",
    "joint": "Joint, all experiences at once (SGD lr 0.1, batch 500, 50 epochs; upper bound)",
    "naive": "context: Naive (AdamW, batch 500)",
    "si": "context: SI (AdamW, batch 500)",
    "replay": "context: Replay, same buffer (AdamW, batch 500)",
}


def run_joint(
    make_strategy: Callable[[nn.Module], Any], model: nn.Module, stream: Stream, device: torch.device
) -> RunResult:
    from avalanche.benchmarks import tensors_benchmark

    bench = tensors_benchmark(stream.train, stream.test, task_labels=stream.task_labels)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        strategy = make_strategy(model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        strategy.train(bench.train_stream, eval_streams=[])
    result = RunResult("joint", [evaluate(model, stream, device)])
    result.seconds = time.perf_counter() - start
    return result


def summarise(runs: list[RunResult]) -> dict[str, Any]:
    """mean and population std over seeds of accuracy, both forgettings and plasticity."""

    def stats(values: list[float]) -> dict[str, float]:
        t = torch.tensor(values, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(values) > 1 else 0.0}

    out: dict[str, Any] = {"seeds": len(runs), "seconds": stats([r.seconds for r in runs])}
    for key in ("accuracy", "forgetting_avalanche", "forgetting", "plasticity"):
        values = [getattr(r, key) for r in runs]
        out[key] = stats(values) if all(v == v for v in values) else None
    return out


def authors_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table: mean and population std over seeds (std shown only for rows with several seeds)."""
    lines = [
        "| method | seeds | accuracy | forgetting (Avalanche StreamForgetting) | forgetting (supplement, "
        "max-based) | plasticity | time per seed (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():

        def cell(v: dict[str, float] | None, seeds: int = s["seeds"]) -> str:
            if v is None:
                return "-"
            return f"{v['mean']:.3f}" + (f" ± {v['std']:.3f}" if seeds > 1 else "")

        lines.append(
            f"| {label(name)} | {s['seeds']} | {cell(s['accuracy'])} "
            f"| {cell(s['forgetting_avalanche'])} | {cell(s['forgetting'])} | {cell(s['plasticity'])} "
            f"| {s['seconds']['mean']:.0f} |"
        )
    return "\n".join(lines)


def run_authors(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    per_episode = None if args.steps is None else args.steps * args.batch // args.epochs
    runs: dict[str, list[RunResult]] = {name: [] for name in args.methods}
    extras: dict[str, list[Any]] = {name: [] for name in args.methods}
    source = "?"
    for seed in args.seeds:
        torch.manual_seed(seed)
        stream = authors_rotated_mnist(args.episodes, per_episode, seed, args.download, log, args.test_images)
        source = stream.source
        log(
            f"seed {seed}: {args.episodes} experiences, {len(stream.train[0][1])} train / "
            f"{len(stream.test[0][1])} test images each ({stream.source}); re-basin "
            f"{len(stream.train[0][1]) * args.epochs // args.batch} steps per experience"
        )
        torch.manual_seed(seed)
        init_model, spec = make_authors_mlp()
        init_state = {k: v.clone() for k, v in init_model.state_dict().items()}
        for name, factory in authors_strategies(args, spec, device, args.episodes).items():
            torch.manual_seed(seed)
            model = make_authors_mlp()[0]
            model.load_state_dict(init_state)
            model.to(device)
            log(f"{name} (seed {seed}):")
            if name == "joint":
                r = run_joint(factory, model, stream, device)
                strategy = None
            else:
                r, strategy = run_strategy(name, factory, model, stream, device, log, seen_only=True)
            plugin = getattr(strategy, "rebasin_plugin", None)
            extras[name].append(plugin.history if plugin is not None else None)
            log(
                f"{name} (seed {seed}): accuracy {r.accuracy:.3f}, forgetting avalanche "
                f"{r.forgetting_avalanche:.3f} / supplement {r.forgetting:.3f}, plasticity "
                f"{r.plasticity:.3f}, {r.seconds:.0f} s"
            )
            runs[name].append(r)
            if args.out is not None:  # partial results survive an interrupted run
                write_json_atomic(
                    args.out.with_suffix(".json"), authors_payload(args, device, source, runs, extras)
                )
    payload = authors_payload(args, device, source, runs, extras)
    print(authors_table(payload["summary"]), flush=True)
    if args.out is not None:
        write_json_atomic(args.out.with_suffix(".json"), payload)
        first = {name: rs[0] for name, rs in runs.items() if name != "joint" and rs}
        if first:
            plot(list(first.values()), args.plot_tasks, args.out.with_suffix(".png"))
    return payload


def authors_payload(
    args: argparse.Namespace,
    device: torch.device,
    source: str,
    runs: dict[str, list[RunResult]],
    extras: dict[str, list[Any]],
) -> dict[str, Any]:
    keys = {name: variant(name, args.recipe, args.override) for name in runs}
    summary = {keys[name]: summarise(rs) for name, rs in runs.items() if rs}
    return {
        "protocol": "authors",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "override"},
        "override": args.override,
        "source": source,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "summary": summary,
        "runs": {
            name: [
                {
                    "seed": seed,
                    "accuracy": r.accuracy,
                    "forgetting_avalanche": r.forgetting_avalanche,
                    "forgetting_supplement": r.forgetting,
                    "plasticity": r.plasticity,
                    "seconds": r.seconds,
                    "acc_matrix": r.acc_matrix,
                    "rebasin_history": extra,
                }
                for seed, r, extra in zip(args.seeds, rs, extras[name])
            ]
            for name, rs in runs.items()
            if rs
        },
    }


def variant(name: str, recipe: str, override: dict[str, Any]) -> str:
    """The table key of a run: the method, and for re-basin its recipe and ``--set`` overrides when they
    are not the paper's row (``"released"`` without the clamp *is* the paper's row)."""
    if name != "rebasin":
        return name
    override = dict(override)
    if recipe == "released" and "delta_grad_clip" in override and override["delta_grad_clip"] is None:
        recipe = "paper"
        del override["delta_grad_clip"]
    parts = ([] if recipe == "paper" else [f"recipe={recipe}"]) + [
        f"{k}={v}" for k, v in sorted(override.items())
    ]
    return "rebasin (" + ", ".join(parts) + ")" if parts else "rebasin"


def label(key: str) -> str:
    if key in AUTHORS_LABELS:
        return AUTHORS_LABELS[key]
    if key.startswith("rebasin ("):
        return "re-basin, " + key[len("rebasin (") : -1] + " (fixed 50/exp buffer, AdamW, batch 500)"
    return key


def merge_authors(paths: list[Path], out: Path | None) -> dict[str, Any]:
    """One table from several runs of the authors' protocol (e.g. one process per method or per seed on
    a many-core machine): runs of the same method are pooled over seeds. The runs must share ``--steps``
    and ``--test-images``."""
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    for key in ("steps", "test_images", "episodes"):
        values = {json.dumps(pl["args"].get(key)) for pl in payloads}
        if len(values) > 1:
            raise SystemExit(f"--merge: the runs differ in {key}: {sorted(values)}")
    runs: dict[str, list[RunResult]] = {}
    raw: dict[str, list[Any]] = {}
    for pl in payloads:
        for method, items in pl["runs"].items():
            name = variant(method, pl["args"].get("recipe", "released"), pl.get("override") or {})
            for item in items:
                if any(item["seed"] == other["seed"] for other in raw.get(name, [])):
                    raise SystemExit(f"--merge: {name} seed {item['seed']} appears twice")
                r = RunResult(name, item["acc_matrix"], item["seconds"])
                runs.setdefault(name, []).append(r)
                raw.setdefault(name, []).append(item)
    order = sorted(runs, key=lambda k: (AUTHORS_METHODS.index(k.split(" ")[0]), k))
    summary = {name: summarise(runs[name]) for name in order}
    print(authors_table(summary), flush=True)
    payload = {**payloads[0], "merged_from": [str(p) for p in paths], "summary": summary, "runs": raw}
    if out is not None:
        write_json_atomic(out.with_suffix(".json"), payload)
        first = [runs[name][0] for name in order if name != "joint"]
        if first:
            tasks = [t for t in (1, 5, 10, 15, 20) if t <= len(first[0].acc_matrix)]
            plot(first, tasks, out.with_suffix(".png"))
    return payload


def write_json_atomic(path: Path, payload: Any) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- report
def plot(results: list[RunResult], tasks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.0), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results):
        n = len(r.acc_matrix)
        for t in tasks:
            if t <= n:
                ax.plot(range(t, n + 1), [r.acc_matrix[e][t - 1] for e in range(t - 1, n)], label=f"task {t}")
        ax.set_title(f"{r.name}\nacc {r.accuracy:.2f}, forg {r.forgetting:.2f}", fontsize=8)
        ax.set_xlabel("episode")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[RunResult]) -> str:
    lines = ["| method | accuracy | forgetting | time (s) |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.accuracy:.3f} | {r.forgetting:.3f} | {r.seconds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", choices=["rotated-mnist", "split-cifar100"], default="rotated-mnist")
    p.add_argument(
        "--protocol",
        choices=["authors", "quick"],
        default="authors",
        help="rotated-mnist: the authors' released experiment (default) or the quick offline setting",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="authors: re-basin steps per experience (100 * steps training images each; default all "
        "60,000 = 600 steps)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="authors: seeds (mean and spread)")
    p.add_argument(
        "--methods", nargs="+", choices=AUTHORS_METHODS, default=AUTHORS_METHODS, help="authors: methods"
    )
    p.add_argument(
        "--test-images", type=int, default=None, help="authors: test images per rotation (default all 10,000)"
    )
    p.add_argument(
        "--baseline-epochs",
        type=int,
        default=None,
        help="authors: every baseline's epochs (default: each as the authors ran it, AUTHORS_BASELINES)",
    )
    p.add_argument("--per-experience", type=int, default=50, help="authors: buffer samples per experience")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="authors: pool the results of several runs (per method / per seed) into one table; --out writes it",
    )
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--step-deg", type=float, default=9.47)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the first task (and of the baselines)")
    p.add_argument("--lr-perm", type=float, default=0.1)
    p.add_argument("--lr-delta", type=float, default=0.05)
    p.add_argument(
        "--alphas", type=float, nargs="+", default=None, help="quick: grid (0 .. 1); authors: first (0.2)"
    )
    p.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=None,
        help="quick: grid (1e-4, 0.1, 1); authors: first (0.1)",
    )
    p.add_argument(
        "--recipe",
        choices=["paper", "released", "procedure"],
        default=None,
        help="re-basin settings (default: paper for the authors' protocol, released for quick)",
    )
    p.add_argument(
        "--set",
        dest="override",
        metavar="NAME=VALUE",
        nargs="+",
        default=[],
        help="override a ReBasinIncremental argument of the recipe, e.g. --set delta_grad_clip=none",
    )
    p.add_argument(
        "--rebasin-replay",
        type=int,
        nargs="+",
        default=[0],
        help="replay buffer sizes for the re-basin runs (0: none); each size is a separate run",
    )
    p.add_argument("--fusions", nargs="+", choices=["permuted", "literal"], default=["permuted", "literal"])
    p.add_argument("--baselines", nargs="*", default=["naive", "ewc", "lwf", "si", "replay"])
    p.add_argument("--ewc-lambda", type=float, default=100.0)
    p.add_argument("--lwf-alpha", type=float, default=1.0)
    p.add_argument("--si-lambda", type=float, default=1.0)
    p.add_argument(
        "--replay-mem",
        type=int,
        default=1000,
        help="Replay buffer (the released experiment: 5 per class per task)",
    )
    p.add_argument("--plot-tasks", type=int, nargs="+", default=[1, 5, 10, 15, 20])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST / CIFAR-100")
    p.add_argument(
        "--synthetic", action="store_true", help="split-cifar100 on random tensors (plumbing only)"
    )
    p.add_argument("--per-class", type=int, default=None, help="training images per class (split-cifar100)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="3 episodes, 1 epoch, one grid point, two baselines")
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.png (default: none)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        args.override = {
            k: None if v.lower() == "none" else float(v)
            for k, v in (item.split("=", 1) for item in args.override)
        }
    except ValueError:
        p.error(f"--set takes NAME=NUMBER (or NAME=none) items, got {args.override}")
    if args.merge:
        return merge_authors(args.merge, args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    authors = args.benchmark == "rotated-mnist" and args.protocol == "authors"
    if args.recipe is None:
        args.recipe = "paper" if authors else "released"
    if args.alphas is None:
        args.alphas = [0.2] if authors else [0.0, 0.2, 0.5, 0.8, 1.0]
    if args.betas is None:
        args.betas = [0.1] if authors else [1e-4, 1e-1, 1.0]
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.test_images is not None and args.test_images < 1:
        p.error(f"--test-images must be >= 1, got {args.test_images}")
    if authors:
        if args.smoke:
            args.episodes, args.steps, args.baseline_epochs = min(args.episodes, 3), 2, 1
            args.plot_tasks = [1, 2, 3]
            args.methods = [m for m in args.methods if m in ("rebasin", "finetune", "joint")] or ["rebasin"]
        args.seeds = args.seeds or [args.seed]
        device = torch.device(args.device)
        log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
        return run_authors(args, device, log)
    if args.smoke:
        args.episodes, args.epochs = min(args.episodes, 3), 1
        args.alphas, args.betas, args.baselines = [0.8], [0.1], ["naive", "ewc"][: len(args.baselines)]
        args.plot_tasks = [1, 2, 3]
    device = torch.device(args.device)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))

    torch.manual_seed(args.seed)
    if args.benchmark == "rotated-mnist":
        stream = rotated_mnist(args.episodes, args.step_deg, args.seed, args.download)
        init_model, spec = make_mlp()
    else:
        if args.synthetic and args.per_class is None:
            args.per_class = 4
        stream = split_cifar100(args.episodes, args.seed, args.download, args.synthetic, args.per_class)
        init_model, spec = make_multihead_resnet18()
    log(
        f"{args.benchmark}: {args.episodes} episodes, {len(stream.train[0][1])} train / "
        f"{len(stream.test[0][1])} test images per task ({stream.source})"
    )
    init_state = {k: v.clone() for k, v in init_model.state_dict().items()}

    results = []
    for name, factory in strategies(args, spec, device).items():
        torch.manual_seed(args.seed)
        model = type(init_model)() if args.benchmark != "rotated-mnist" else make_mlp()[0]
        model.load_state_dict(init_state)
        model.to(device)
        log(f"{name}:")
        r, _ = run_strategy(name, factory, model, stream, device, log)
        log(f"{name}: accuracy {r.accuracy:.3f}, forgetting {r.forgetting:.3f}, {r.seconds:.0f} s")
        results.append(r)

    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "source": stream.source,
            "results": [
                {
                    "name": r.name,
                    "accuracy": r.accuracy,
                    "forgetting": r.forgetting,
                    "seconds": r.seconds,
                    "acc_matrix": r.acc_matrix,
                }
                for r in results
            ],
        }
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        best = max(
            (r for r in results if r.name.startswith("rebasin[") and ",permuted," in r.name),
            key=lambda r: r.accuracy,
            default=None,
        )
        shown = ([best] if best else []) + [r for r in results if not r.name.startswith("rebasin")]
        shown += [r for r in results if r.name.startswith("rebasin[") and ",literal," in r.name][:1]
        plot(shown, args.plot_tasks, args.out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
