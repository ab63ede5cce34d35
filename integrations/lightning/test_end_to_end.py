"""End to end: the Lightning callbacks on timm test_resnet (BatchNorm, residuals, SGD momentum), resume, DDP, LightningCLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("timm")

from integrations.lightning.models import ImageClassifier, SyntheticImages, save_reference  # noqa: E402
from rebasin_callbacks.lightning import LMCMonitor, ReBasinAlign  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ALIGN = {"steps": 5, "seed": 0}


def _trainer(tmp_path: Path, callbacks, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def _fit(tmp_path: Path, callbacks=(), max_epochs: int = 2, ckpt_path=None, **kwargs) -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier("timm:test_resnet")
    data = SyntheticImages(n_train=32, n_val=16, batch_size=16)
    _trainer(tmp_path, callbacks, max_epochs, **kwargs).fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    return save_reference(str(tmp_path_factory.mktemp("ref") / "reference.pt"))


def _inputs() -> torch.Tensor:
    return SyntheticImages(n_train=8)._make(8, seed=5).tensors[0]


def test_fit_resnet_with_both_callbacks_keeps_the_function(tmp_path, reference):
    plain = _fit(tmp_path / "plain")
    align = ReBasinAlign(reference, submodule="model", align_kwargs=ALIGN)
    monitor = LMCMonitor(
        reference, submodule="model", n_points=3, max_batches=1, save_dir=str(tmp_path / "lmc")
    )
    model = _fit(tmp_path / "aligned", [align, monitor])
    # same losses and the same function (BatchNorm statistics and momentum buffers were permuted too) ...
    torch.testing.assert_close(torch.tensor(model.losses), torch.tensor(plain.losses), rtol=1e-3, atol=1e-4)
    x = _inputs()
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=1e-3, atol=1e-3)
    # ... with the weights permuted towards the reference
    assert len(align.history) == 2
    assert align.history[0]["l2_after"] < align.history[0]["l2_before"]
    assert not torch.equal(model.model.conv1[0].weight, plain.model.conv1[0].weight)
    assert [r["epoch"] for r in monitor.results] == [0, 1]
    assert len(list((tmp_path / "lmc").glob("*.png"))) == 2


def test_resume_mid_run_continues_identically(tmp_path, reference):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks():
        return [ReBasinAlign(reference, submodule="model", align_kwargs=ALIGN)]

    full = _fit(tmp_path / "full", callbacks(), max_epochs=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "first", [*callbacks(), ckpt], max_epochs=1, enable_checkpointing=True)
    resumed_cbs = callbacks()
    resumed = _fit(tmp_path / "second", resumed_cbs, max_epochs=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [h["epoch"] for h in resumed_cbs[0].history] == [0, 1]
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_two_cpu_processes_end_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "integrations.lightning.ddp_run", str(tmp_path), "--devices", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), key
    assert ranks[0]["perms"].keys() == ranks[1]["perms"].keys()
    for group, perm in ranks[0]["perms"].items():
        assert torch.equal(perm, ranks[1]["perms"][group]), group
    assert len(ranks[0]["align_history"]) == 2
    assert ranks[0]["lmc_history"] == ranks[1]["lmc_history"]  # reduced over both shards
    assert len(list((tmp_path / "lmc").glob("*.png"))) == 2  # figures from rank zero only, once per epoch


def test_lightning_cli_config_instantiates_the_callbacks(tmp_path, reference):
    from integrations.lightning.cli import main

    config = (Path(__file__).parent / "config.yaml").read_text()
    config = config.replace("reference.ckpt", reference).replace("lightning_logs", str(tmp_path / "logs"))
    path = tmp_path / "config.yaml"
    path.write_text(config)
    cli = main(["fit", "--config", str(path)])
    align, monitor = (cb for cb in cli.trainer.callbacks if isinstance(cb, (ReBasinAlign, LMCMonitor)))
    assert isinstance(align, ReBasinAlign) and isinstance(monitor, LMCMonitor)
    assert (align.mode, align.submodule, align.align_kwargs) == ("inplace", "model", {"steps": 5, "seed": 0})
    assert monitor.n_points == 3 and monitor.every_n_epochs == 2
    rows = list(csv.DictReader(open(Path(cli.trainer.logger.log_dir) / "metrics.csv")))
    assert sum(1 for r in rows if r.get("rebasin/l2_after")) == 2
    assert sum(1 for r in rows if r.get("lmc/rebasin_barrier")) == 1
