"""Does aligning attention heads as units lower the barrier between two independently trained ViTs?

Pairs of small timm ``VisionTransformer`` (patch 7 on 28x28 MNIST: 16 tokens, 4 blocks, 4 heads, width 96)
are trained from different seeds on full MNIST and the second of each pair is permuted into the first one's
basin by

* ``naive``: nothing (the straight line between the two as trained);
* ``wm flat``: weight matching with the spec without head groups (units move inside a head only);
* ``wm heads``: weight matching with the spec that permutes whole heads too (``trace_spec``'s default);
* ``align heads``: :func:`rebasin_callbacks.align`, data-free, from the spec with heads;
* ``align mid flat`` / ``align mid heads``: ``align(cost="mid")`` (only with ``--mid``: slow on a CPU);
  on request (``--methods``): ``align mid500 heads`` (500 steps, early stopping after 200) and
  ``align rnd heads`` (``cost="rnd"``).

``--family resnext`` runs the same methods (one spec: no attention) on two ResNeXt bottlenecks (grouped
3x3 convolutions with 8 groups, GroupNorm); ``--family mixer`` on a tiny timm ``MlpMixer`` (LayerNorm,
token- and channel-mixing MLPs, 4 blocks, width 64). Recurrent layers have their own: ``quality_recurrent.py``.

Reported per pair and method: the loss barrier on the test split along the straight line, and wall time.
Trained models are cached under ``.data/vit/`` so a second run only measures. ``--smoke`` runs one pair
trained on a few hundred images, uncached (a check that the script works, not a measurement).

Usage::

    REBASIN_DATA=/path/to/torchvision/data python benchmarks/quality_vit.py --seeds 2 --epochs 1
    python benchmarks/quality_vit.py --train-only --seeds 3   # train and cache the models
    python benchmarks/quality_vit.py --family mixer --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from rebasin_callbacks.align import align
from rebasin_callbacks.data import mnist
from rebasin_callbacks.lmc import lmc_curve
from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute
from rebasin_callbacks.trace import trace_spec
from rebasin_callbacks.utils import l2_distance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import train_classifier  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / ".data" / "vit"


def make_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=4, num_heads=4,
        mlp_ratio=2.0, global_pool="avg", class_token=False,
    )  # fmt: skip


class SmallResNeXt(nn.Module):
    """Two ResNeXt bottlenecks (1x1, grouped 3x3 with 8 groups, 1x1, GroupNorm throughout) on a 14x14 map."""

    def __init__(self, width: int = 32, inner: int = 64, groups: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.GroupNorm(4, width), nn.ReLU()
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, inner, 1),
                nn.GroupNorm(groups, inner),
                nn.ReLU(),
                nn.Conv2d(inner, inner, 3, padding=1, groups=groups),
                nn.GroupNorm(groups, inner),
                nn.ReLU(),
                nn.Conv2d(inner, width, 1),
                nn.GroupNorm(4, width),
            )  # fmt: skip
            for _ in range(2)
        )
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.fc(h.mean((2, 3)))


def make_mixer() -> nn.Module:
    """A tiny timm MLP-Mixer (LayerNorm, token- and channel-mixing MLPs): patch 7 on 28x28, 16 tokens."""
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(
        num_classes=10, img_size=28, in_chans=1, patch_size=7, num_blocks=4, embed_dim=64,
        mlp_ratio=(2.0, 2.0),
    )  # fmt: skip


FAMILIES = {"vit": make_vit, "resnext": SmallResNeXt, "mixer": make_mixer}
FAMILY = "vit"  # set by --family


def train(seed: int, data: Dataset, epochs: int) -> nn.Module:
    return train_classifier(
        FAMILIES[FAMILY],
        seed,
        data,
        epochs,
        lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01),
    )


def trained(seed: int, data: Dataset, epochs: int, cache: bool = True) -> nn.Module:
    """The model of ``seed``, from the cache when it is there (``cache=False``: trained, never stored)."""
    path = CACHE / f"{FAMILY}_s{seed}_e{epochs}.pt"
    if not cache:
        return train(seed, data, epochs)
    if path.exists():
        model = FAMILIES[FAMILY]()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()
    model = train(seed, data, epochs)
    CACHE.mkdir(parents=True, exist_ok=True)
    from rebasin_callbacks.io import atomic_torch_save

    atomic_torch_save(model.state_dict(), path)
    print(f"trained seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


METHODS = ("naive", "wm flat", "wm heads", "align flat", "align heads")
MID = ("align mid flat", "align mid heads")


def rebase(method: str, model: nn.Module, reference: nn.Module, specs: dict, loader: DataLoader, seed: int):
    """``model`` permuted into ``reference``'s basin by ``method``."""
    if method == "naive":
        return model
    spec = specs[method.split()[-1]]
    if method.startswith("wm"):
        return permute(model, spec, weight_matching(model, reference, spec, seed=seed))
    kwargs: dict = {"spec": spec, "seed": seed, "progress": False}
    if " mid" in method or " rnd " in method:
        kwargs.update(cost=method.split()[1][:3], data=loader, loss_fn=F.cross_entropy)
    if " mid500 " in method:  # more steps, more patience
        kwargs.update(steps=500, early_stopping=200)
    return align(model, reference, **kwargs).model


def evaluate_pair(pair: int, a: nn.Module, b: nn.Module, data, test_loader, methods) -> list[dict]:
    example = next(iter(test_loader))[0][:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        specs = {"heads": trace_spec(b, example), "flat": trace_spec(b, example, heads=False)}
    rows = []
    for method in methods:
        # every method sees the same training batches in the same order
        train_loader = DataLoader(
            data, batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(pair)
        )
        t0 = time.perf_counter()
        rebased = rebase(method, b, a, specs, train_loader, pair)
        seconds = time.perf_counter() - t0
        curve = lmc_curve(
            a, rebased, (test_loader, F.cross_entropy), n_points=5, progress=False, label=method
        )
        label = method if FAMILY == "vit" else method.replace(" heads", "")  # one spec without attention
        rows.append(
            {
                "pair": pair,
                "method": label,
                "loss_barrier": curve.barriers["loss"],
                "seconds": seconds,
                "l2": float(l2_distance(rebased, a)),  # what the data-free methods minimise
            }
        )
        print(
            f"pair {pair} {label:16s} loss barrier {curve.barriers['loss']:.4f}  {seconds:.2f} s", flush=True
        )
    return rows


def markdown(rows: list[dict], methods, command: str) -> str:
    pairs = sorted({r["pair"] for r in rows})
    head = (
        "| method | " + " | ".join(f"pair {p} barrier" for p in pairs) + " | median barrier | median time |"
    )
    lines = [f"Command: `{command}` (CPU, 2 cores, shared)", "", head, "|" + "---|" * (len(pairs) + 3)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells = " | ".join(f"{r['loss_barrier']:.3f}" for r in rs)
        med_b = statistics.median(r["loss_barrier"] for r in rs)
        med_t = statistics.median(r["seconds"] for r in rs)
        lines.append(f"| {m} | {cells} | {med_b:.3f} | {med_t:.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2, help="pairs: seeds (0, 1), (2, 3), ...")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--mid", action="store_true", help='also align(cost="mid") (slow on a CPU)')
    p.add_argument("--methods", nargs="*", help="only these methods (default: all, with --mid the mid ones)")
    p.add_argument("--pairs", type=int, nargs="*", help="only these pairs (default: all)")
    p.add_argument(
        "--family", choices=sorted(FAMILIES), default="vit", help="resnext, mixer: no attention, one spec"
    )
    p.add_argument("--smoke", action="store_true", help="one pair trained on a few hundred images, uncached")
    args = p.parse_args(argv)
    global FAMILY
    FAMILY = args.family
    torch.set_num_threads(1)
    data: Dataset = mnist(train=True)
    test: Dataset = mnist(train=False)
    if args.smoke:
        args.seeds = 1
        data, test = Subset(data, range(256)), Subset(test, range(128))
    models = [trained(s, data, args.epochs, cache=not args.smoke) for s in range(2 * args.seeds)]
    if args.train_only:
        return []
    test_loader = DataLoader(test, batch_size=1000)
    methods = args.methods or list(METHODS) + (list(MID) if args.mid else [])
    if FAMILY != "vit":  # no attention: one spec
        methods = [m for m in methods if not m.endswith("flat")]
    rows: list[dict] = []
    for pair in args.pairs if args.pairs is not None else range(args.seeds):
        rows += evaluate_pair(pair, models[2 * pair], models[2 * pair + 1], data, test_loader, methods)
    labels = list(dict.fromkeys(r["method"] for r in rows))
    print(markdown(rows, labels, "python benchmarks/quality_vit.py " + " ".join(argv or sys.argv[1:])))
    return rows


if __name__ == "__main__":
    main()
