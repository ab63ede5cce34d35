"""How :func:`rebasin_callbacks.align` scales: time per Sinkhorn step, total time, peak memory, planted recovery.

Workloads (all on the device of ``--device``, default CPU; data-free L2 cost):

* ``resnet18``: two randomly initialised timm resnet18 (10 classes, spec traced at 32x32). Sinkhorn steps
  from the identity (``init="identity"``, fixed number of steps) give the time per step; then a planted
  permutation of model A is recovered with the default ``align`` (weight-matching warm start + Sinkhorn).
* ``vgg11``: two randomly initialised torchvision vgg11 (10 classes; 4096-wide classifier groups).
* ``mlp``: MLP 784-512-512-10, model B a planted permutation of A, ``--seeds`` seeds.

Each workload runs in a fresh subprocess so its peak RSS (``resource.getrusage``) is its own; the
baseline RSS (both models and the spec, before aligning) is reported next to it.

Usage::

    python benchmarks/align_scale.py                        # all three
    python benchmarks/align_scale.py --models mlp --seeds 5
    python benchmarks/align_scale.py --smoke                # mlp only, 2 seeds, 2 steps
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn


def _rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_times(history: dict[str, list[float]]) -> list[float]:
    t = history.get("time", [])
    return [b - a for a, b in zip([0.0] + t[:-1], t)]


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "resnet18":
        import timm

        return timm.create_model("resnet18", num_classes=10).eval()
    if name == "vgg11":
        import torchvision

        return torchvision.models.vgg11(num_classes=10).eval()
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
    raise ValueError(f"unknown model {name!r}")


def run_one(name: str, steps: int, seeds: int, device: str) -> dict:
    from rebasin_callbacks.align import align
    from rebasin_callbacks.permute import permute, random_permutations
    from rebasin_callbacks.trace import trace_spec

    example = torch.randn(2, 784) if name == "mlp" else torch.randn(2, 3, 32, 32)
    a = build(name, 0).to(device)
    t0 = time.perf_counter()
    spec = trace_spec(a, example.to(device))
    out: dict = {"model": name, "device": device, "trace_s": time.perf_counter() - t0}
    out["groups"] = {
        str(n): sum(1 for s in spec.sizes.values() if s == n) for n in sorted(set(spec.sizes.values()))
    }
    out["params_M"] = sum(p.numel() for p in a.parameters()) / 1e6
    out["threads"] = torch.get_num_threads()

    if name != "mlp":
        b = build(name, 1).to(device)
        out["rss_baseline_mb"] = _rss_mb()
        c0 = time.process_time()
        result = align(
            a, b, spec=spec, init="identity", steps=steps, early_stopping=None, progress=False, seed=0
        )
        out["cpu_s_per_step"] = (time.process_time() - c0) / max(result.steps, 1)
        times = _step_times(result.history)
        out["step_s_median"] = statistics.median(times)
        out["step_s_all"] = times
        out["steps_timed"] = result.steps
        out["rss_peak_mb"] = _rss_mb()
        if device == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20

    if name in ("resnet18", "mlp"):
        recovered, totals, cpu, n_steps = 0, [], [], []
        for seed in range(seeds if name == "mlp" else 1):
            a_s = build(name, seed).to(device)
            planted = random_permutations(spec, torch.Generator().manual_seed(100 + seed))
            target = permute(a_s, spec, planted)
            t0, c0 = time.perf_counter(), time.process_time()
            result = align(a_s, target, spec=spec, progress=False, seed=seed)
            totals.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            n_steps.append(result.steps)
            recovered += int(_same(result.model, target))
        out["planted_exact"] = f"{recovered}/{len(totals)}"
        out["planted_total_s_median"] = statistics.median(totals)
        out["planted_cpu_s_median"] = statistics.median(cpu)
        out["planted_steps"] = n_steps
        out["rss_peak_mb"] = _rss_mb()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "resnet18", "vgg11"], choices=["mlp", "resnet18", "vgg11"]
    )
    parser.add_argument("--steps", type=int, default=5, help="timed Sinkhorn steps (resnet18, vgg11)")
    parser.add_argument(
        "--vgg-steps", type=int, default=2, help="timed steps for vgg11 (each is expensive on a CPU)"
    )
    parser.add_argument("--seeds", type=int, default=5, help="planted-permutation seeds for the MLP")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="mlp only, 2 seeds")
    parser.add_argument("--out", type=Path, help="append the markdown table here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        steps = args.vgg_steps if args.one == "vgg11" else args.steps
        print(json.dumps(run_one(args.one, steps, args.seeds, args.device)))
        return
    if args.smoke:
        args.models, args.seeds, args.steps = ["mlp"], 2, 2
    rows = []
    for name in args.models:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--vgg-steps",
            str(args.vgg_steps),
        ]
        cmd += ["--seeds", str(args.seeds), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{name} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = [
        f"Command: `python benchmarks/align_scale.py {' '.join(argv or [])}`".replace(" `", " `").rstrip(),
        "",
        "| model | params (M) | groups (size: count) | device | wall time per step (median) | planted: exact, steps, wall time (median) | peak RSS (baseline) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = (
            f"{r['step_s_median']:.2f} s ({r['steps_timed']} steps; CPU time {r['cpu_s_per_step']:.2f} s)"
            if "step_s_median" in r
            else "-"
        )
        planted = (
            f"{r['planted_exact']}, steps {r['planted_steps']}, {r['planted_total_s_median']:.2f} s "
            f"(CPU time {r['planted_cpu_s_median']:.2f} s)"
            if "planted_exact" in r
            else "-"
        )
        base = f" ({r['rss_baseline_mb']:.0f} MB)" if "rss_baseline_mb" in r else ""
        groups = ", ".join(f"{k}: {v}" for k, v in r["groups"].items())
        lines.append(
            f"| {r['model']} | {r['params_M']:.1f} | {groups} | {r['device']} ({r['threads']} threads) | {step} | "
            f"{planted} | {r['rss_peak_mb']:.0f} MB{base} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
