"""Thread oversubscription: torch's default intra-op threads vs a cap, on an idle and on a loaded machine.

Two workloads, each run in a fresh interpreter per measurement (so each gets its own thread pool):

* ``step``: one Sinkhorn re-basin step of :func:`~rebasin_callbacks.align` (``steps=1``, identity start,
  data-free L2; the final projection and permutation included) on two random-init torchvision resnet18
  (32x32 input), repeated ``--repeats`` times inside one process after tracing and a warm-up;
* ``demo``: ``rebasin demo --smoke`` end to end (the whole command, imports included).

Thread settings: ``default`` (torch's own: one thread per core, no cap anywhere: ``REBASIN_NUM_THREADS=off``),
``1`` (one thread), ``auto`` (the library's default cap, :func:`rebasin_callbacks.utils.default_threads`;
the same as ``1`` on a machine with fewer than 8 cores). The "loaded" machine runs
one busy-loop process per core, started by this script and killed after each measurement. Settings are
interleaved within each repeat; medians are reported, with each median's ratio to the single-thread
median on the same load.

Example:
    $ nice -n 10 python benchmarks/threads.py --repeats 3 --out benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_CHILD = r"""
import json, sys, time, warnings
import torch, torchvision
warnings.filterwarnings("ignore")
threads = sys.argv[1]
from rebasin_callbacks import align, trace_spec
from rebasin_callbacks.utils import thread_limit
torch.manual_seed(0)
a = torchvision.models.resnet18(num_classes=10).eval()
b = torchvision.models.resnet18(num_classes=10).eval()
spec = trace_spec(a, torch.randn(2, 3, 32, 32))
limit = None if threads == "default" else ("auto" if threads == "auto" else int(threads))
with thread_limit(limit):
    n = torch.get_num_threads()
    align(b, a, spec=spec, steps=1, init="identity", progress=False)  # warm-up
    times = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        align(b, a, spec=spec, steps=1, init="identity", progress=False)
        times.append(time.perf_counter() - start)
print(json.dumps({"seconds": times, "threads": n}))
"""


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()  # only the processes this script started
    for p in procs:
        p.wait()


def _env(threads: str) -> dict[str, str]:
    """``default``: no cap anywhere in the library (``REBASIN_NUM_THREADS=off``); else the library's own."""
    env = {k: v for k, v in os.environ.items() if k != "REBASIN_NUM_THREADS"}
    env.update(MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="")
    if threads == "default":
        env["REBASIN_NUM_THREADS"] = "off"
    return env


def _run_step(threads: str, repeats: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", STEP_CHILD, threads, str(repeats)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
        env=_env(threads),
    )
    return [float(x) for x in json.loads(out.stdout.strip().splitlines()[-1])["seconds"]]


def _run_demo(threads: str, repeats: int) -> list[float]:
    return [_demo_once(threads) for _ in range(repeats)]


def _demo_once(threads: str) -> float:
    flag = {"default": ["--threads", "0"], "1": ["--threads", "1"], "auto": []}[threads]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rebasin_callbacks",
                "demo",
                "--smoke",
                "--no-progress",
                "--out",
                tmp,
                *flag,
            ],
            capture_output=True,
            text=True,
            timeout=3600,
            check=True,
            env=_env(threads),
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="step,demo")
    parser.add_argument("--settings", default="default,1,auto")
    parser.add_argument("--loads", default="idle,loaded")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    runners = {"step": _run_step, "demo": _run_demo}
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    # the step workload repeats inside one process per setting (imports and tracing once); the demo is one
    # process per run. Settings alternate within each round so that drifting machine load hits all of them.
    rounds = {"step": 1, "demo": args.repeats}
    per_call = {"step": args.repeats, "demo": 1}
    for workload in args.workloads.split(","):
        for rep in range(rounds[workload]):
            for load in args.loads.split(","):
                for threads in args.settings.split(","):
                    procs = _busy(cores) if load == "loaded" else []
                    try:
                        seconds = runners[workload](threads, per_call[workload])
                    finally:
                        _stop(procs)
                    times.setdefault(workload, {}).setdefault(load, {}).setdefault(threads, []).extend(
                        seconds
                    )
                    shown = " ".join(f"{t:.2f}" for t in seconds)
                    print(f"round {rep} {workload:5s} {load:6s} threads={threads:7s} {shown} s", flush=True)
    table = {}
    print(f"\ncores: {cores}; load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'workload':8s} {'load':7s} {'threads':8s} {'median s':>9s} {'vs 1 thread':>12s}")
    for workload, by_load in times.items():
        for load, by_threads in by_load.items():
            base = statistics.median(by_threads["1"]) if "1" in by_threads else None
            for threads, values in by_threads.items():
                med = statistics.median(values)
                ratio = med / base if base else float("nan")
                table[f"{workload}/{load}/{threads}"] = {"median": med, "ratio_vs_1": ratio, "all": values}
                print(f"{workload:8s} {load:7s} {threads:8s} {med:9.2f} {ratio:12.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cores": cores, "results": table}, indent=1))


if __name__ == "__main__":
    main()
