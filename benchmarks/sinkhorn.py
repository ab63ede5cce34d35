"""Sinkhorn forward+backward: our implicit gradient vs the published dense system vs unrolled autograd.

For each size n, one ``[n, n]`` score matrix goes through ``tau``-scaled Sinkhorn with the same number of
iterations in all three methods, then a backward pass of a random linear loss:

* ``implicit``  rebasin_callbacks.sinkhorn (stabilised scaling forward, Schur-complement implicit backward);
* ``dense``     the published formulation: log-domain iterations, then the dense (2n-1)x(2n-1) solve;
* ``unrolled``  rebasin_callbacks.sinkhorn(backward="unrolled"): autograd through the iterations.

The scores are scaled by ``1/tau`` once, outside the timed region, and the backward is
``torch.autograd.grad(P, S, dL/dP)``, so only the Sinkhorn layer itself is measured.
Time: median of ``--repeats`` runs, methods interleaved in one process. Memory: the backward's extra peak,
measured in a fresh subprocess per (method, n): resident-set high-water mark (reset before the backward) on
CPU, ``torch.cuda.max_memory_allocated`` on GPU.

    python benchmarks/sinkhorn.py                   # CPU, n in 128 512 1024 2048
    python benchmarks/sinkhorn.py --device cuda     # same table on a GPU
    python benchmarks/sinkhorn.py --sizes 128 256 --repeats 3   # quick
    python benchmarks/sinkhorn.py --baseline DIR     # against another version of the package, interleaved
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

from rebasin_callbacks.sinkhorn import SinkhornConvergenceWarning, dense_implicit_grad, sinkhorn

METHODS: tuple[str, ...] = ("implicit", "dense", "unrolled")
#: another version's ``rebasin_callbacks/sinkhorn.py`` (``--baseline DIR``), timed as method "baseline"
_BASELINE: Any = None


def load_baseline(directory: str) -> Any:
    """The ``sinkhorn`` module of another version of the package (``DIR/rebasin_callbacks/sinkhorn.py``)."""
    path = os.path.join(directory, "rebasin_callbacks", "sinkhorn.py")
    spec = importlib.util.spec_from_file_location("_baseline_sinkhorn", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: no {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_baseline_sinkhorn"] = module
    spec.loader.exec_module(module)
    return module


class _DenseSinkhorn(torch.autograd.Function):
    """Published formulation: fixed log-domain iterations, dense implicit backward."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, n_iters: int) -> torch.Tensor:  # type: ignore[override]
        log_p = S.clone()
        for _ in range(n_iters):
            log_p -= torch.logsumexp(log_p, dim=-1, keepdim=True)
            log_p -= torch.logsumexp(log_p, dim=-2, keepdim=True)
        P = log_p.exp()
        ctx.save_for_backward(P)
        return P

    @staticmethod
    def backward(ctx, grad_P: torch.Tensor):  # type: ignore[override]
        (P,) = ctx.saved_tensors
        return dense_implicit_grad(P, grad_P), None


def run_forward(method: str, S: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Sinkhorn of the (already temperature-scaled) scores ``S``."""
    if method == "dense":
        return _DenseSinkhorn.apply(S, n_iters)
    if method == "baseline":
        return _BASELINE.sinkhorn(S, tau=1.0, n_iters=n_iters, tol=0.0)
    # Fixed iteration budgets (tol=0) leave sharp plans unconverged on purpose: the warning (and the one
    # read-back deciding it, which users pay) stays on, its message is silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        return sinkhorn(S, tau=1.0, n_iters=n_iters, tol=0.0, backward=method)  # type: ignore[arg-type]


def make_inputs(n: int, device: str, tau: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores S = scores / tau (a leaf) and the upstream gradient dL/dP."""
    g = torch.Generator().manual_seed(seed)
    S = (torch.randn(n, n, generator=g) / tau).to(device).requires_grad_(True)
    grad_P = torch.randn(n, n, generator=g).to(device)
    return S, grad_P


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: the clock: wall time by default; ``--cpu-time`` uses this thread's CPU time, which a machine shared with
#: other jobs barely disturbs (meaningful with ``--threads 1`` on the CPU, where all the work is this thread's)
_clock = time.perf_counter


def time_one(method: str, n: int, device: str, tau: float, n_iters: int) -> tuple[float, float]:
    S, grad_P = make_inputs(n, device, tau)
    _sync(device)
    t0 = _clock()
    P = run_forward(method, S, n_iters)
    _sync(device)
    t1 = _clock()
    torch.autograd.grad(P, S, grad_P)
    _sync(device)
    t2 = _clock()
    return t1 - t0, t2 - t1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory(method: str, n: int, device: str, tau: float, n_iters: int) -> dict[str, float]:
    """Extra peak memory (bytes) of the forward (what autograd keeps) and of the backward."""
    # Warm up first, so lazily loaded kernels and libraries are not counted.
    S, grad_P = make_inputs(64, device, tau)
    torch.autograd.grad(run_forward(method, S, n_iters), S, grad_P)
    S, grad_P = make_inputs(n, device, tau)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        P = run_forward(method, S, n_iters)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.autograd.grad(P, S, grad_P)
        torch.cuda.synchronize()
        return {"kept": kept, "backward": torch.cuda.max_memory_allocated() - before}
    base = _rss_bytes()
    P = run_forward(method, S, n_iters)
    kept = _rss_bytes() - base
    before = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark
        f.write("5")
    torch.autograd.grad(P, S, grad_P)
    return {"kept": kept, "backward": _hwm_bytes() - before}


def memory_in_subprocess(method: str, n: int, device: str, tau: float, n_iters: int) -> dict[str, float]:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import sinkhorn as b; "
        f"print(json.dumps(b.measure_memory({method!r}, {n}, {device!r}, {tau}, {n_iters})))"
    )
    # A fixed mmap threshold makes glibc return every large block on free, so RSS tracks live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations, the same for every method")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--cpu-time", action="store_true", help="time with this thread's CPU time (use --threads 1)"
    )
    ap.add_argument(
        "--baseline",
        metavar="DIR",
        help="also time the implicit layer of another version of the package found in DIR "
        "(e.g. `git archive <commit> rebasin_callbacks | tar -x -C DIR`), interleaved; implies --no-memory",
    )
    args = ap.parse_args(argv)
    global _clock
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.device != "cpu":
            raise SystemExit("--cpu-time measures the CPU: use it with --device cpu")
        _clock = time.thread_time
    global _BASELINE, METHODS
    if args.baseline:
        _BASELINE = load_baseline(args.baseline)
        METHODS = (*METHODS, "baseline")
        args.no_memory = True

    torch.manual_seed(0)
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"iters={args.iters} tau={args.tau} repeats={args.repeats} clock={'cpu' if args.cpu_time else 'wall'}"
    )
    rows = []
    for n in args.sizes:
        for m in METHODS:  # warm-up
            time_one(m, n, args.device, args.tau, args.iters)
        samples: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        for _ in range(args.repeats):
            for m in METHODS:
                samples[m].append(time_one(m, n, args.device, args.tau, args.iters))
        med = {
            m: (
                statistics.median(s[0] for s in samples[m]),
                statistics.median(s[1] for s in samples[m]),
                statistics.median(s[0] + s[1] for s in samples[m]),
            )
            for m in METHODS
        }
        mem = {}
        if not args.no_memory:
            mem = {m: memory_in_subprocess(m, n, args.device, args.tau, args.iters) for m in METHODS}
        rows.append((n, med, mem))

    mib = 2.0**20
    print()
    print(
        "| n | method | forward ms | backward ms | total ms | total vs dense | backward extra peak MiB "
        "| kept by autograd MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, med, mem in rows:
        for m in METHODS:
            fwd, bwd, tot = med[m]
            ratio = med["dense"][2] / tot
            peak = f"{mem[m]['backward'] / mib:.1f}" if mem else "-"
            kept = f"{mem[m]['kept'] / mib:.1f}" if mem else "-"
            print(
                f"| {n} | {m} | {fwd * 1e3:.1f} | {bwd * 1e3:.1f} | {tot * 1e3:.1f} | {ratio:.2f}x | {peak} | {kept} |"
            )
    print(
        "\n(one n x n float32 matrix: 4.0 MiB at n=1024; the backward's extra peak includes the returned gradient)"
    )


if __name__ == "__main__":
    main()
