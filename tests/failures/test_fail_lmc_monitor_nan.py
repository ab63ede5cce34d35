"""LMCMonitor on a run that diverges: the curves of a model holding NaN/inf are logged as NaN with a warning
naming the entry, never as numbers that look fine, and training goes on as without the monitor."""

from __future__ import annotations

import math

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from test_fail_lightning_training import Net, _loader, _reference, _trainer  # noqa: E402

from rebasin_callbacks.lightning import LMCMonitor  # noqa: E402


class Diverge(pl.Callback):
    """Puts a NaN into the model at the end of epoch 1 (before the monitor runs)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                pl_module.model[2].weight[0, 0] = float("nan")


def test_monitor_logs_nan_curves_for_a_diverged_model(tmp_path):
    monitor = LMCMonitor(_reference(), submodule="model", data="train", n_points=3, save_dir=str(tmp_path))
    with pytest.warns(
        UserWarning, match=r"epoch 1: the trained model: '2.weight' holds 1 NaN/inf.*logged as NaN"
    ):
        _trainer(tmp_path, [Diverge(), monitor], max_epochs=3).fit(Net(), _loader())
    assert len(monitor.history) == 3
    first, diverged = monitor.history[0], monitor.history[1]
    assert math.isfinite(first["lmc/naive_barrier"]) and math.isfinite(first["lmc/rebasin_barrier"])
    assert math.isnan(diverged["lmc/naive_barrier"]) and math.isnan(diverged["lmc/rebasin_barrier"])
    assert monitor.results[1]["naive"].nonfinite == {"loss": [0.0, 0.5, 1.0]}
