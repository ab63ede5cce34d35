"""Lightning callbacks: bad configuration fails at setup or on the first batch, before training time is spent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from rebasin_callbacks.lightning import LMCMonitor, ReBasinAlign  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.steps = 0

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["pixels"], batch["cls"]) if isinstance(batch, dict) else batch
        self.steps += 1
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))


class _Odd(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        x, y = _data()[i]
        return {"pixels": x, "cls": y}


def _trainer(tmp_path: Path, callbacks) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )


@pytest.mark.parametrize("cls", [ReBasinAlign, LMCMonitor])
def test_nan_reference_fails_at_setup(tmp_path, cls):
    reference = Net().model
    with torch.no_grad():
        reference[2].weight[0, 0] = float("nan")
    net = Net()
    kwargs = {"data": "train"} if cls is LMCMonitor else {}
    with pytest.raises(ValueError, match=r"reference: '2.weight' holds 1 NaN/inf"):
        _trainer(tmp_path, [cls(reference, submodule="model", **kwargs)]).fit(
            net, DataLoader(_data(), batch_size=8)
        )
    assert net.steps == 0


def test_monitor_with_unknown_dict_batches_fails_on_the_first_batch(tmp_path):
    net = Net()
    monitor = LMCMonitor(Net().model, submodule="model", data="train")
    with pytest.raises(TypeError, match=r"LMCMonitor\(data='train'\).*input key.*'pixels'"):
        _trainer(tmp_path, [monitor]).fit(net, DataLoader(_Odd(), batch_size=8))
    assert net.steps == 0


def test_monitor_with_unknown_dict_loader_fails_at_setup(tmp_path):
    net = Net()
    monitor = LMCMonitor(Net().model, submodule="model", data=DataLoader(_Odd(), batch_size=8))
    with pytest.raises(TypeError, match="input key"):
        _trainer(tmp_path, [monitor]).fit(net, DataLoader(_data(), batch_size=8))
    assert net.steps == 0


def test_monitor_with_target_free_val_batches_fails_in_the_sanity_check(tmp_path):
    net = Net()
    monitor = LMCMonitor(Net().model, submodule="model")
    val = DataLoader(torch.randn(16, 4), batch_size=8)  # inputs only
    with pytest.raises(TypeError, match="no targets"):
        _trainer(tmp_path, [monitor]).fit(net, DataLoader(_data(), batch_size=8), val)
    assert net.steps == 0


@pytest.mark.parametrize("cls", [ReBasinAlign, LMCMonitor])
def test_spec_without_groups_or_not_fitting_fails_at_setup(tmp_path, cls):
    """A given spec is resolved against the aligned module at setup: one that permutes nothing, or names a
    key the module lacks, stops the fit before the first step, naming the problem."""
    from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError

    empty = PermutationSpec.from_axes({"0.weight": (None, None)})
    wrong = PermutationSpec.from_axes({"0.weight": ("P", None), "9.weight": (None, "P")})
    kwargs = {"data": "train"} if cls is LMCMonitor else {}
    for spec, error, words in [
        (empty, ValueError, "no permutation groups"),
        (wrong, SpecMismatchError, "9.weight"),
    ]:
        net = Net()
        with pytest.raises(error, match=words):
            _trainer(tmp_path, [cls(Net().model, submodule="model", spec=spec, **kwargs)]).fit(
                net, DataLoader(_data(), batch_size=8)
            )
        assert net.steps == 0
