"""Weight matching speed on torchvision models: this checkout against a baseline checkout, one script.

Workloads: two randomly initialised torchvision models (seeds 0 and 1, 10 classes, spec traced at
32x32 and not timed) matched with :func:`rebasin_callbacks.weight_matching` (``seed=0``). Random
initialisations are the worst case: their similarities have no structure, so every linear assignment is
a full solve.

Each (implementation, model) cell runs in a fresh subprocess (traces once, then ``--repeats`` timed
calls; the median is reported). ``--baseline DIR`` names a directory holding another version of the
``rebasin_callbacks`` package (e.g. ``git archive <commit> rebasin_callbacks | tar -x -C DIR``); the two
implementations alternate model by model, and the table gives the speed-up and whether both returned the
same permutations.

    python benchmarks/matching_speed.py                                   # this checkout, CPU
    python benchmarks/matching_speed.py --baseline /tmp/before --repeats 3
    python benchmarks/matching_speed.py --device cuda --models resnet50 vgg11
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("resnet18", "resnet50", "vgg11")


def run_cell(model: str, device: str, repeats: int, threads: int | None = None) -> dict:
    import torch
    import torchvision

    if threads:
        torch.set_num_threads(threads)

    from rebasin_callbacks import trace_spec, weight_matching

    torch.manual_seed(0)
    a = getattr(torchvision.models, model)(num_classes=10).eval().to(device)
    torch.manual_seed(1)
    b = getattr(torchvision.models, model)(num_classes=10).eval().to(device)
    spec = trace_spec(a, torch.randn(2, 3, 32, 32, device=device))
    if device.startswith("cuda"):
        weight_matching(a, b, spec, seed=0, n_iters=1)  # warm-up (kernels, allocator)
    times, cpu_times, perms = [], [], {}
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        perms = weight_matching(a, b, spec, seed=0)
        times.append(time.perf_counter() - t0)  # the result is on the CPU: the device has finished
        cpu_times.append(time.process_time() - c0)
    return {
        "model": model,
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "groups": len(spec),
        "widest": max(spec.sizes.values()),
        "times": times,
        "median_s": statistics.median(times),
        "cpu_times": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "perms": {g: p.tolist() for g, p in perms.items()},
    }


def _cell_in_subprocess(
    model: str, device: str, repeats: int, package_dir: str | None, threads: int | None
) -> dict:
    env = dict(os.environ)
    if package_dir:
        env["PYTHONPATH"] = os.pathsep.join([package_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", model, "--device", device]
    cmd += ["--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
    # Run outside the checkout so that a baseline on PYTHONPATH is the package imported.
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(package_dir or "/")
    )
    if proc.returncode != 0:
        raise SystemExit(f"{model} ({package_dir or 'this checkout'}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", help="directory holding another version of the rebasin_callbacks package")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1: CPU time is a stable measure)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args.cell, args.device, args.repeats, args.threads)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for model in args.models:
        new = _cell_in_subprocess(model, args.device, args.repeats, here, args.threads)
        old = (
            _cell_in_subprocess(model, args.device, args.repeats, args.baseline, args.threads)
            if args.baseline
            else None
        )
        print(json.dumps({k: v for k, v in new.items() if k != "perms"}), flush=True)
        if old:
            print(json.dumps({k: v for k, v in old.items() if k != "perms"}), flush=True)
        rows.append((new, old))
    print(f"\nCommand: `python benchmarks/matching_speed.py {' '.join(argv or sys.argv[1:])}`\n")
    print(
        "| model (groups, widest) | device | wall s, median (runs) | CPU s, median | baseline wall / CPU s "
        "| speed-up (CPU time) | same permutations |"
    )
    print("|---|---|---|---|---|---|---|")
    for new, old in rows:
        runs = ", ".join(f"{t:.2f}" for t in new["times"])
        base = f"{old['median_s']:.2f} / {old['median_cpu_s']:.2f}" if old else "-"
        speed = f"{old['median_cpu_s'] / new['median_cpu_s']:.1f}x" if old else "-"
        same = ("yes" if old["perms"] == new["perms"] else "no") if old else "-"
        print(
            f"| {new['model']} ({new['groups']}, {new['widest']}) | {new['device']} | "
            f"{new['median_s']:.2f} ({runs}) | {new['median_cpu_s']:.2f} | {base} | {speed} | {same} |"
        )


if __name__ == "__main__":
    main()
