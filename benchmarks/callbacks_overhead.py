"""Overhead of the Lightning callbacks as a fraction of a training epoch.

For each workload the same training is run with no callback, with ``ReBasinAlign`` (every epoch, in place)
and with ``LMCMonitor`` (every epoch, naive + re-based curves); the time spent inside each callback's epoch-end
hook and the time of the epoch itself (training batches + validation) are measured separately, and the
medians over epochs are reported (the first epoch, which includes tracing and warm-up, is reported apart).

Workloads: the demo's MLP 784-512-512-10 on the offline MNIST subset (4,000 images, batch 128) and timm
resnet18 on synthetic CIFAR-size input (32x32, 512 images, batch 64).

Example:
    $ python benchmarks/callbacks_overhead.py --epochs 4 --out benchmarks/results/lightning_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from rebasin_callbacks.lightning import LMCMonitor, ReBasinAlign

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared models


class EpochClock(pl.Callback):
    """Wall time of each training epoch (batches and validation), without the timed callbacks' hooks."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.epochs.append(time.perf_counter() - self._start)


def timed(callback: pl.Callback) -> pl.Callback:
    """Wrap ``callback.on_train_epoch_end`` to record the seconds it takes in ``callback.hook_seconds``."""
    hook = callback.on_train_epoch_end
    callback.hook_seconds = []  # type: ignore[attr-defined]

    def wrapper(trainer, pl_module):
        start = time.perf_counter()
        hook(trainer, pl_module)
        callback.hook_seconds.append(time.perf_counter() - start)  # type: ignore[attr-defined]

    callback.on_train_epoch_end = wrapper  # type: ignore[method-assign]
    return callback


def _mlp_workload() -> dict[str, Any]:
    from rebasin_callbacks.data import mnist
    from rebasin_callbacks.demo import MNISTClassifier as classifier

    train, test = mnist(True, flatten=True), mnist(False, flatten=True)
    return {
        "name": "MLP 784-512-512-10, MNIST 4,000 images, batch 128",
        "make_model": lambda: classifier(width=512),
        "train": DataLoader(train, batch_size=128, shuffle=False),
        "val": DataLoader(test, batch_size=500),
        "reference": lambda: classifier(width=512).model,
    }


def _resnet_workload() -> dict[str, Any]:
    from bench_models import lit_classifier, synthetic_images

    from rebasin_callbacks.commands.common import build_model

    return {
        "name": "timm resnet18, 32x32 synthetic, 512 images, batch 64",
        "make_model": lambda: lit_classifier(build_model("timm:resnet18", num_classes=10)),
        "train": DataLoader(synthetic_images(512, seed=0), batch_size=64, shuffle=False),
        "val": DataLoader(synthetic_images(256, seed=1), batch_size=64),
        "reference": lambda: build_model("timm:resnet18", num_classes=10),
    }


def run_workload(workload: dict[str, Any], epochs: int, align_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for variant in ("none", "ReBasinAlign", "LMCMonitor"):
        torch.manual_seed(1)
        reference = workload["reference"]()
        pl.seed_everything(0, verbose=False)
        model = workload["make_model"]()
        clock = EpochClock()
        callbacks: list[pl.Callback] = [clock]
        if variant == "ReBasinAlign":
            callbacks.append(timed(ReBasinAlign(reference, submodule="model", align_kwargs=align_kwargs)))
        elif variant == "LMCMonitor":
            callbacks.append(
                timed(
                    LMCMonitor(
                        reference,
                        submodule="model",
                        n_points=11,
                        align_kwargs=align_kwargs,
                        save_dir=tempfile.mkdtemp(prefix="lmc-"),
                    )
                )
            )
        trainer = pl.Trainer(
            accelerator="auto",
            devices=1,
            max_epochs=epochs,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, workload["train"], workload["val"])
        epoch = statistics.median(clock.epochs[1:] or clock.epochs)
        hooks = getattr(callbacks[-1], "hook_seconds", [])
        hook = statistics.median(hooks[1:] or hooks) if hooks else 0.0
        rows.append(
            {
                "workload": workload["name"],
                "callback": variant,
                "epoch_s": epoch,
                "hook_s": hook,
                "first_hook_s": hooks[0] if hooks else 0.0,
                "overhead": hook / epoch,
                "epochs": epochs,
                "all_epochs_s": clock.epochs,
                "all_hooks_s": hooks,
            }
        )
        print(
            f"{workload['name']:55s} {variant:13s} epoch {epoch:7.2f} s  hook {hook:7.2f} s  "
            f"(first {rows[-1]['first_hook_s']:.2f} s)  overhead {100 * hook / epoch:6.1f} %  "
            f"epochs {[round(e, 2) for e in clock.epochs]} hooks {[round(h, 2) for h in hooks]}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is reported apart")
    parser.add_argument("--workloads", nargs="+", default=["mlp", "resnet18"], choices=["mlp", "resnet18"])
    parser.add_argument("--align-steps", type=int, default=None, help="align() steps (its default otherwise)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    align_kwargs: dict[str, Any] = {"seed": 0}
    if args.align_steps is not None:
        align_kwargs["steps"] = args.align_steps
    makers = {"mlp": _mlp_workload, "resnet18": _resnet_workload}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    rows = []
    for name in args.workloads:
        rows += run_workload(makers[name](), args.epochs, align_kwargs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
