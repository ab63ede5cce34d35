"""Everything whose speed depends on the device, in one script: run it with ``--device cuda`` on a GPU.

Sections (``--sections``, all by default):

* ``sinkhorn``: the Sinkhorn layer alone, forward + backward, n in 512 / 1024 / 2048 / 4096 at tau 1 and
  0.05 (20 iterations): ``implicit`` (ours), ``dense`` (the published (2n-1) x (2n-1) solve) and
  ``unrolled`` (autograd through the iterations), with the CUDA peak of each cell;
* ``matching``: :func:`~rebasin_callbacks.weight_matching` of two random-init torchvision models
  (resnet18, resnet50, vgg11; the spec traced at 32x32 is not timed);
* ``step``: one Sinkhorn re-basin step (data-free L2, from the identity, median over ``--steps`` steps)
  and the CUDA peak of the whole alignment; the seed package ``sinkhorn-rebasin`` (``RebasinNet`` +
  ``DistL2Loss``, its defaults) as a peer on the same models when it is importable;
* ``align``: the default :func:`~rebasin_callbacks.align` end to end (weight-matching warm start, then
  Sinkhorn refinement with early stopping).

Timings are medians of ``--repeats`` runs after a warm-up; on CUDA every timed region is closed by
``torch.cuda.synchronize()``. Every row names the device. ``--quick`` shrinks everything (tiny matrices,
an MLP instead of the torchvision models) so that the script itself is tested on the CPU.

    python benchmarks/gpu.py --device cuda                 # the full GPU table
    python benchmarks/gpu.py --device cuda --sections sinkhorn
    python benchmarks/gpu.py --device cpu --quick          # smoke run
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

SECTIONS = ("sinkhorn", "matching", "step", "align")
MODELS = ("resnet18", "resnet50", "vgg11")
_HERE = Path(__file__).resolve().parent


def _sinkhorn_bench() -> Any:
    """benchmarks/sinkhorn.py (its dense reference and timing helpers), loaded by path."""
    spec = importlib.util.spec_from_file_location("_bench_sinkhorn", _HERE / "sinkhorn.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_bench_sinkhorn"] = module
    spec.loader.exec_module(module)
    return module


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def _peak_mib(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated(torch.device(device)) / 2**20:.0f}"
    return "-"


def timed(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of ``fn()`` (synchronised on CUDA) and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build(name: str, seed: int, device: str) -> tuple[nn.Module, torch.Tensor]:
    """A randomly initialised model and an example input for tracing."""
    torch.manual_seed(seed)
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )
        example = torch.randn(2, 16)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=10)
        example = torch.randn(2, 3, 32, 32)
    return model.eval().to(device), example.to(device)


def bench_sinkhorn(device: str, sizes: list[int], taus: list[float], repeats: int) -> Iterator[dict]:
    sk = _sinkhorn_bench()
    for tau in taus:
        for n in sizes:
            for method in sk.METHODS:
                S, grad_P = sk.make_inputs(n, device, tau)

                def fwd_bwd(method: str = method, S: torch.Tensor = S, grad_P: torch.Tensor = grad_P) -> None:
                    P = sk.run_forward(method, S, 20)
                    torch.autograd.grad(P, S, grad_P)

                fwd_bwd()  # warm-up outside the peak measurement
                _reset_peak(device)
                seconds, _ = timed(fwd_bwd, device, repeats, warmup=0)
                yield {
                    "section": "sinkhorn",
                    "workload": f"n={n}, tau={tau:g}, 20 iterations, forward+backward",
                    "method": method,
                    "time": f"{seconds * 1e3:.1f} ms",
                    "peak": _peak_mib(device),
                }
                del S, grad_P


def bench_matching(device: str, models: list[str], repeats: int) -> Iterator[dict]:
    from rebasin_callbacks import trace_spec, weight_matching

    for name in models:
        a, example = build(name, 0, device)
        b, _ = build(name, 1, device)
        spec = trace_spec(a, example)
        # On CUDA also the CPU solver alone, to show what the on-device auction buys.
        for solver in ("auto", "scipy") if device.startswith("cuda") else ("auto",):
            _reset_peak(device)
            seconds, _ = timed(
                lambda a=a, b=b, spec=spec, solver=solver: weight_matching(
                    a, b, spec, seed=0, assignment_solver=solver
                ),
                device,
                repeats,
            )
            yield {
                "section": "matching",
                "workload": f"{name}: weight_matching, two random inits ({len(spec)} groups, "
                f"widest {max(spec.sizes.values())})",
                "method": f"rebasin-callbacks (assignment_solver={solver})",
                "time": f"{seconds:.3f} s",
                "peak": _peak_mib(device),
            }


def _seed_package() -> Any:
    """The seed package's ``(RebasinNet, DistL2Loss)``, or None when it is not installed."""
    try:
        from rebasin import RebasinNet  # type: ignore[import-not-found]
        from rebasin.loss import DistL2Loss  # type: ignore[import-not-found]
    except Exception:  # not installed, or another package of that name
        return None
    return RebasinNet, DistL2Loss


def bench_step(device: str, models: list[str], steps: int) -> Iterator[dict]:
    from rebasin_callbacks import align, trace_spec

    for name in models:
        a, example = build(name, 0, device)
        b, _ = build(name, 1, device)
        spec = trace_spec(a, example)
        align(
            a, b, spec=spec, init="identity", steps=1, early_stopping=None, progress=False, seed=0
        )  # warm-up
        _reset_peak(device)
        result = align(
            a, b, spec=spec, init="identity", steps=steps, early_stopping=None, progress=False, seed=0
        )
        _sync(device)
        t = result.history["time"]
        per_step = statistics.median(y - x for x, y in zip([0.0] + t[:-1], t))
        yield {
            "section": "step",
            "workload": f"{name}: one Sinkhorn step, data-free L2 (median of {result.steps}); peak of the alignment",
            "method": "rebasin-callbacks",
            "time": f"{per_step:.3f} s",
            "peak": _peak_mib(device),
        }
        peer = _seed_package()
        if peer is not None and name != "mlp":
            yield _seed_step(peer, name, a, b, example, device, steps)
        del result


def _seed_step(
    peer: Any, name: str, a: nn.Module, b: nn.Module, example: torch.Tensor, device: str, steps: int
) -> dict:
    RebasinNet, DistL2Loss = peer
    _reset_peak(device)
    pi = RebasinNet(copy.deepcopy(a), input_shape=tuple(example[:1].shape)).to(device)
    pi.identity_init()
    pi.train()
    criterion = DistL2Loss(b)
    optimizer = torch.optim.Adam(pi.p.parameters(), lr=0.1)

    def step() -> None:
        loss = criterion(pi())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds, _ = timed(step, device, steps)
    return {
        "section": "step",
        "workload": f"{name}: one Sinkhorn step, data-free L2; peak of the alignment",
        "method": "sinkhorn-rebasin (seed package)",
        "time": f"{seconds:.3f} s",
        "peak": _peak_mib(device),
    }


def bench_align(device: str, models: list[str], repeats: int) -> Iterator[dict]:
    from rebasin_callbacks import align, trace_spec

    for name in models:
        a, example = build(name, 0, device)
        b, _ = build(name, 1, device)
        spec = trace_spec(a, example)
        _reset_peak(device)
        seconds, result = timed(
            lambda a=a, b=b, spec=spec: align(a, b, spec=spec, progress=False, seed=0), device, repeats
        )
        yield {
            "section": "align",
            "workload": f"{name}: default align() end to end ({result.steps} Sinkhorn steps after the warm start)",
            "method": "rebasin-callbacks",
            "time": f"{seconds:.3f} s",
            "peak": _peak_mib(device),
        }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=(*MODELS, "mlp"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--taus", type=float, nargs="+", default=[1.0, 0.05])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="Sinkhorn steps timed per model in 'step'")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and an MLP: a smoke run")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.quick:
        args.sizes, args.models, args.repeats, args.steps = [16, 32], ["mlp"], 1, 2
    name = device_name(args.device)
    print(f"device={name} torch={torch.__version__} repeats={args.repeats}", flush=True)
    command = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nCommand: `{command.strip()}`\n")
    print("| section | workload | method | time (median) | CUDA peak MiB | device |")
    print("|---|---|---|---|---|---|", flush=True)
    sections = {
        "sinkhorn": lambda: bench_sinkhorn(args.device, args.sizes, args.taus, args.repeats),
        "matching": lambda: bench_matching(args.device, args.models, args.repeats),
        "step": lambda: bench_step(args.device, args.models, args.steps),
        "align": lambda: bench_align(args.device, args.models, max(1, min(args.repeats, 3))),
    }
    rows: list[dict] = []
    failed: list[str] = []
    with warnings.catch_warnings():
        # Fixed iteration budgets leave sharp plans unconverged on purpose.
        warnings.simplefilter("ignore", RuntimeWarning)
        for section in SECTIONS:
            if section not in args.sections:
                continue
            # Each row is printed as soon as it is measured and a failing section does not stop the
            # others: a run cut short by a time limit still reports what it measured.
            try:
                for r in sections[section]():
                    rows.append(r)
                    print(
                        f"| {r['section']} | {r['workload']} | {r['method']} | {r['time']} | {r['peak']} | {name} |",
                        flush=True,
                    )
            except Exception:
                failed.append(section)
                traceback.print_exc()
    if failed:
        raise SystemExit(f"benchmarks/gpu.py: section(s) {', '.join(failed)} failed (traceback above)")
    return rows


if __name__ == "__main__":
    main()
