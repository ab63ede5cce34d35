"""Reproduce Table 1 of the supplement (section 1, "Finding optimal transport") and its timing claim.

MLPs with 2, 4 and 8 hidden layers of 10 tanh units, 1 input and 1 output, initialised three ways:

* ``Rnd``: every parameter drawn from N(0, 1);
* ``Pol1``: trained on y = x + 3, x in (-4, -2);
* ``Pol3``: trained on y = (x - 3)^3, x in (2, 4) (targets plus N(0, 0.05) noise, 0.05 read as the std).

The target is a random permutation of the model, either exact or with Gaussian noise of variance 1e-3
added to every parameter of the permuted model. Methods, side by side on the same pairs:

* ``align``: :func:`rebasin_callbacks.align` with the L2 cost (weight-matching warm start, then Sinkhorn);
* ``sinkhorn``: the same with ``init="identity"``: the paper's pure Sinkhorn re-basin (at most 100 steps);
* ``wm``: :func:`rebasin_callbacks.weight_matching` alone.

Reported per cell: L1 x 1e4 (mean absolute difference over all parameters between the re-based model and
the expected re-basin, i.e. the noise-free planted permutation of the model; the paper's Eq. 1 normalised by
the parameter count; 0 when the permutation is found), exact recoveries, mean steps and median time per
model (after one warm-up call; the machine's other load inflates wall times).
Section 4's claim (50 models re-based: Sinkhorn 0.18 s vs weight matching 0.35 s) is measured in the same
run, methods interleaved.

Usage::

    python benchmarks/table1.py                 # full table, 10 seeds
    python benchmarks/table1.py --smoke         # 2 seeds, depth 2 only: a quick check
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from rebasin_callbacks.align import align
from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec

Perms = dict[str, Tensor]


def make_mlp(hidden: int, width: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(1, width), nn.Tanh()]
    for _ in range(hidden - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def mlp_spec(model: nn.Sequential) -> PermutationSpec:
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    axes: dict[str, tuple[str | None, ...]] = {}
    for j, i in enumerate(linears):
        out = f"P{j}" if j < len(linears) - 1 else None
        axes[f"{i}.weight"] = (out, f"P{j - 1}" if j > 0 else None)
        axes[f"{i}.bias"] = (out,)
    return PermutationSpec.from_axes(axes, model.state_dict())


TASKS: dict[str, tuple[Callable[[Tensor], Tensor], tuple[float, float]]] = {
    "Pol1": (lambda x: x + 3, (-4.0, -2.0)),
    "Pol3": (lambda x: (x - 3) ** 3, (2.0, 4.0)),
}


def initial_model(init: str, hidden: int, seed: int, train_steps: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = make_mlp(hidden)
    if init == "Rnd":
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        return model
    fn, (lo, hi) = TASKS[init]
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(100, 1, generator=gen)
    y = fn(x) + 0.05 * torch.randn(100, 1, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(train_steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def l1(a: nn.Module, b: nn.Module) -> float:
    diffs = [(pa - pb).abs().sum() for pa, pb in zip(a.parameters(), b.parameters())]
    return float(sum(diffs)) / sum(p.numel() for p in a.parameters())


def exact(perms: Perms, planted: Perms) -> bool:
    return all(torch.equal(perms[g], planted[g]) for g in planted)


def run_method(
    method: str, model: nn.Module, target: nn.Module, spec: PermutationSpec, seed: int
) -> tuple[Perms, int]:
    if method == "wm":
        return weight_matching(model, target, spec, seed=seed), 0
    init = "weight_matching" if method == "align" else "identity"
    result = align(model, target, spec=spec, cost="l2", init=init, steps=100, progress=False, seed=seed)
    return result.perms, result.steps


def table(
    seeds: int,
    depths: list[int],
    inits: list[str],
    methods: list[str],
    train_steps: int,
    noises: list[float] = (0.0, 1e-3),  # type: ignore[assignment]
) -> list[dict]:
    """``noises``: variances of the Gaussian noise added to the target (0: the exact permutation)."""
    rows = []
    for noise in noises:
        for init in inits:
            for hidden in depths:
                cell: dict[str, dict[str, list[float]]] = {
                    m: {"l1": [], "exact": [], "steps": [], "time": []} for m in methods
                }
                for seed in range(seeds):
                    model = initial_model(init, hidden, seed, train_steps)
                    spec = mlp_spec(model)
                    gen = torch.Generator().manual_seed(1000 + seed)
                    planted = random_permutations(spec, gen)
                    expected = permute(model, spec, planted)
                    target = copy.deepcopy(expected)
                    if noise:
                        with torch.no_grad():
                            for p in target.parameters():
                                p.add_(noise**0.5 * torch.randn(p.shape, generator=gen))
                    for m in methods:
                        t0 = time.perf_counter()
                        perms, steps = run_method(m, model, target, spec, seed)
                        cell[m]["time"].append(time.perf_counter() - t0)
                        cell[m]["l1"].append(1e4 * l1(permute(model, spec, perms), expected))
                        cell[m]["exact"].append(float(exact(perms, planted)))
                        cell[m]["steps"].append(steps)
                for m in methods:
                    c = cell[m]
                    rows.append(
                        {
                            "noise": f"{noise:g}" if noise else "none",
                            "init": init,
                            "hidden": hidden,
                            "method": m,
                            "l1_mean": statistics.mean(c["l1"]),
                            "l1_std": statistics.pstdev(c["l1"]),
                            "exact": int(sum(c["exact"])),
                            "n": seeds,
                            "steps": statistics.mean(c["steps"]),
                            "time_ms": 1e3 * statistics.median(c["time"]),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"noise={r['noise']:5s} {init:4s} hidden={hidden} {m:8s} L1x1e4={r['l1_mean']:8.3f}"
                        f"±{r['l1_std']:.3f} exact={r['exact']}/{seeds} steps={r['steps']:.1f} "
                        f"time={r['time_ms']:.1f} ms",
                        flush=True,
                    )
    return rows


def timing_claim(n_models: int, hidden: int, repeats: int) -> dict[str, list[float]]:
    """Re-base the same ``n_models`` Rnd models with every method, interleaved; total seconds per repeat."""
    pairs = []
    for seed in range(n_models):
        model = initial_model("Rnd", hidden, seed, 0)
        spec = mlp_spec(model)
        pairs.append(
            (
                model,
                permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(seed))),
                spec,
            )
        )
    totals: dict[str, list[float]] = {"align": [], "sinkhorn": [], "wm": []}
    for _ in range(repeats):
        for m in totals:
            t0 = time.perf_counter()
            for i, (model, target, spec) in enumerate(pairs):
                run_method(m, model, target, spec, i)
            totals[m].append(time.perf_counter() - t0)
    return totals


def markdown(rows: list[dict], totals: dict[str, list[float]], n_models: int, command: str) -> str:
    lines = [
        "### Table 1 (supplement section 1): L1 x 1e4 to the expected re-basin, exact recoveries, mean steps, median time per model",
        "",
        f"Command: `{command}`",
        "",
        "| target noise | init | hidden | method | L1 x 1e4 | exact | steps | time (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['noise']} | {r['init']} | {r['hidden']} | {r['method']} | {r['l1_mean']:.3f} ± {r['l1_std']:.3f} | "
            f"{r['exact']}/{r['n']} | {r['steps']:.1f} | {r['time_ms']:.1f} |"
        )
    lines += [
        "",
        f"### Timing claim (supplement section 4): {n_models} models re-based, total seconds (median of repeats)",
        "",
        "| method | seconds for all models | per model (ms) |",
        "|---|---|---|",
    ]
    for m, values in totals.items():
        med = statistics.median(values)
        lines.append(f"| {m} | {med:.3f} | {1e3 * med / n_models:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="2 seeds, depth 2, Rnd only, 5 timing models")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--inits", nargs="+", default=["Rnd", "Pol3", "Pol1"], choices=["Rnd", "Pol1", "Pol3"]
    )
    parser.add_argument(
        "--methods", nargs="+", default=["align", "sinkhorn", "wm"], choices=["align", "sinkhorn", "wm"]
    )
    parser.add_argument("--train-steps", type=int, default=500, help="Adam steps for the Pol1/Pol3 models")
    parser.add_argument(
        "--noises",
        type=float,
        nargs="+",
        default=[0.0, 1e-3],
        help="variances of the noise added to the planted target (0: none); the paper: 0 and 1e-3",
    )
    parser.add_argument("--timing-models", type=int, default=50)
    parser.add_argument("--timing-hidden", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.depths, args.inits, args.timing_models, args.repeats = 2, [2], ["Rnd"], 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warm = initial_model("Rnd", 2, 0, 0)  # first calls pay for lazy imports and kernel setup
    for m in args.methods:
        run_method(m, warm, warm, mlp_spec(warm), 0)
    rows = table(args.seeds, args.depths, args.inits, args.methods, args.train_steps, args.noises)
    totals = timing_claim(args.timing_models, args.timing_hidden, args.repeats)
    command = "python benchmarks/table1.py" + (" " + " ".join(argv) if argv else "")
    text = markdown(rows, totals, args.timing_models, command)
    print(text)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)  # atomic: a failed write leaves the previous table


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
