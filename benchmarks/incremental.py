"""Re-basin incremental learning (Procedure 1) against Avalanche's baselines.

Rotated MNIST (default): 20 episodes, each rotated 9.47 degrees more than the last; MLP 784-256-10 ReLU;
the supplement's hyper-parameters (5 epochs per episode, batch 500, Adam lr 0.001 on the first task,
Adam lr 0.1 for the permutations, SGD lr 0.05 for the residual, alpha 0.8, beta 0.1). Every method runs
as an Avalanche strategy on the same stream and the same initial weights: ReBasinStrategy over a grid of
alpha x beta with both fusion readings, and Naive, EWC, LwF, SI and Replay. After every episode the model
is evaluated on every task's test set, which gives the supplement's metrics:

* accuracy = mean over all tasks' test sets of the final model;
* forgetting = per task (all but the last), max over earlier episodes of its accuracy minus its final
  accuracy, averaged.

Split CIFAR-100 (``--benchmark split-cifar100``): 20 tasks of 5 classes, a multi-head ResNet18 (torchvision,
3x3 stem, one head per task), task-incremental. Needs torchvision's CIFAR-100 on disk or ``--download``;
``--synthetic`` runs the same pipeline on random tensors of the same shape (a plumbing check only).

Usage::

    python benchmarks/incremental.py                     # full Rotated MNIST run, writes results
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

from rebasin_callbacks.incremental import RELEASED_SETTINGS
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
        n = len(self.acc_matrix)
        drops = [
            max(self.acc_matrix[e][t] for e in range(t, n - 1)) - self.acc_matrix[-1][t] for t in range(n - 1)
        ]
        return sum(drops) / len(drops) if drops else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, stream: Stream, device: torch.device, batch: int = 1000) -> list[float]:
    from avalanche.models import MultiTaskModule

    model.eval()
    accs = []
    for (x, y), t in zip(stream.test, stream.task_labels):
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
) -> RunResult:
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
        result.acc_matrix.append(evaluate(model, stream, device))
        seen = result.acc_matrix[-1][: e + 1]
        log(f"  {name} episode {e + 1}: current {seen[-1]:.3f}, mean over seen {sum(seen) / len(seen):.3f}")
    result.seconds = time.perf_counter() - start
    return result


def recipe(
    name: str, alpha: float, beta: float, lr_perm: float, lr_delta: float, override: dict[str, float]
) -> dict[str, Any]:
    """ReBasinStrategy arguments for a recipe.

    * ``procedure``: Procedure 1 as printed: permutations start at the identity (soft P = I), the cost is
      ``loss + beta ||delta||^2``, Adam for P, SGD for delta.
    * ``released``: the settings of the authors' released code: scores ``I + 0.1 N(0, 1)`` at tau 1 (a
      near-uniform soft P for a 256-unit layer), AdamW for P, SGD with weight decay ``beta`` for delta and
      no penalty term, the residual's gradient clamped to 1e-3 element-wise.
    """
    kwargs: dict[str, Any] = dict(alpha=alpha, lr_perm=lr_perm, lr_delta=lr_delta)
    if name == "procedure":
        out = {
            **kwargs,
            "beta": beta,
            "incremental_kwargs": dict(init_scale=10.0, init_noise=0.0, delta_grad_clip=None),
        }
    elif name == "released":
        out = {
            **kwargs,
            "beta": 0.0,
            "incremental_kwargs": dict(
                **RELEASED_SETTINGS,
                delta_weight_decay=beta,
                perm_optimizer=lambda ps: torch.optim.AdamW(ps, lr=lr_perm),
            ),
        }
    else:
        raise ValueError(f"unknown recipe {name!r}")
    out["incremental_kwargs"].update(override)
    return out


def strategies(
    args: argparse.Namespace, spec: Any, device: torch.device
) -> dict[str, Callable[[nn.Module], Any]]:
    """name -> factory(model) -> Avalanche strategy; all share the first-task optimiser and schedule."""
    from avalanche.training import EWC, LwF, Naive, Replay, SynapticIntelligence

    from rebasin_callbacks.avalanche import ReBasinStrategy

    common = dict(
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=args.batch,
        train_epochs=args.epochs,
        eval_mb_size=1000,
        device=device,
        evaluator=None,
    )

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


def main(argv: list[str] | None = None) -> list[RunResult]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmark", choices=["rotated-mnist", "split-cifar100"], default="rotated-mnist")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--step-deg", type=float, default=9.47)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the first task (and of the baselines)")
    p.add_argument("--lr-perm", type=float, default=0.1)
    p.add_argument("--lr-delta", type=float, default=0.05)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8, 1.0])
    p.add_argument("--betas", type=float, nargs="+", default=[1e-4, 1e-1, 1.0])
    p.add_argument("--recipe", choices=["procedure", "released"], default="released", help=recipe.__doc__)
    p.add_argument(
        "--set",
        dest="override",
        metavar="NAME=VALUE",
        nargs="+",
        default=[],
        help="override a ReBasinIncremental argument of the recipe, e.g. --set delta_grad_clip=0.01",
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
        args.override = {k: float(v) for k, v in (item.split("=", 1) for item in args.override)}
    except ValueError:
        p.error(f"--set takes NAME=NUMBER items, got {args.override}")
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
        r = run_strategy(name, factory, model, stream, device, log)
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
