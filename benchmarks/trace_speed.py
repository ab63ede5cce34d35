"""`trace_spec` wall time (its own verification included): this checkout against a baseline checkout.

Each (implementation, model) cell runs in a fresh subprocess: the model is built once (random init, no
download), then `trace_spec` is timed ``--repeats`` times on a 2x3x64x64 input and the median is reported
with the number of groups found. ``--baseline DIR`` names a directory holding another version of the
``rebasin_callbacks`` package (``git archive <commit> rebasin_callbacks | tar -x -C DIR``); the two
implementations alternate model by model.

    python benchmarks/trace_speed.py                                     # this checkout
    python benchmarks/trace_speed.py --baseline DIR --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

MODELS = ("tv.resnet50", "tv.vgg11", "maxvit_tiny_tf_224")


def _build(name: str):  # noqa: ANN202 - torch is imported inside the cell
    import torch

    torch.manual_seed(0)
    if name.startswith("tv."):
        import torchvision

        return getattr(torchvision.models, name[3:])(num_classes=10).eval()
    import timm

    kwargs = {"img_size": 64} if "maxvit" in name else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


def run_cell(name: str, repeats: int) -> dict:
    import torch

    from rebasin_callbacks import trace_spec

    model, x = _build(name), torch.randn(2, 3, 64, 64)
    times, groups = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            t0 = time.perf_counter()
            groups = len(trace_spec(model, x))
            times.append(time.perf_counter() - t0)
    return {"model": name, "times": times, "median_s": statistics.median(times), "groups": groups}


def _cell(name: str, repeats: int, package_dir: str | None) -> dict:
    env = dict(os.environ)
    if package_dir:
        env["PYTHONPATH"] = os.pathsep.join([package_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", name, "--repeats", str(repeats)]
    # outside the checkout, so that a baseline on PYTHONPATH is the package imported
    proc = subprocess.run(cmd, env=env, cwd=os.path.dirname(package_dir or os.sep) or os.sep,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="a directory holding another rebasin_callbacks")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell, args.repeats)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("| model | this checkout: median s (groups) | baseline: median s (groups) | ratio |")
    print("|---|---|---|---|")
    for name in args.models:
        new = _cell(name, args.repeats, here)
        old = _cell(name, args.repeats, os.path.abspath(args.baseline)) if args.baseline else None
        old_text = f"{old['median_s']:.2f} ({old['groups']})" if old else "-"
        ratio = f"{new['median_s'] / old['median_s']:.2f}" if old else "-"
        print(f"| {name} | {new['median_s']:.2f} ({new['groups']}) | {old_text} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
