"""How long the `rebasin` command takes to answer `--help` and a usage error, against `import torch`.

Each case runs in a fresh Python process; the cases are interleaved and repeated, and the median is
reported with the ratio to a bare `import torch` measured in the same run (the floor an eager CLI pays).

    python benchmarks/cli_start.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "import torch (baseline)": "import torch",
    "rebasin --help": (
        "from rebasin_callbacks.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    ),
    "rebasin align (usage error)": (
        "from rebasin_callbacks.cli import main\ntry:\n    main(['align'])\nexcept SystemExit:\n    pass"
    ),
    "rebasin --help imports torch?": (
        "import sys\nfrom rebasin_callbacks.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
        "    pass\nassert 'torch' not in sys.modules, 'torch was imported'"
    ),
}


def run(repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(repeats):
        for name, code in CASES.items():
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            times[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise SystemExit(f"{name!r} failed:\n{proc.stderr[-2000:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = run(args.repeats)
    base = statistics.median(times["import torch (baseline)"])
    print("| case | median wall (s) | / import torch | runs |\n|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {med:.2f} | {med / base:.2f} | {runs} |")


if __name__ == "__main__":
    main()
