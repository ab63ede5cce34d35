"""The callbacks among the rest of a Trainer: everything that holds the weights is permuted with them
(weight averaging, SWA, pending gradients, every optimizer), sharded strategies are refused at setup, the
training run's random state of every kind is left as it was, endless data never hangs, and a
``torch.compile``'d submodule is aligned like the plain one."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from rebasin_callbacks.lightning import LMCMonitor, ReBasinAlign  # noqa: E402
from rebasin_callbacks.permute import permute_state_dict  # noqa: E402


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(torch.randn(n, 6, generator=g) + F.one_hot(y, 6).float(), y)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


class Net(pl.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = _mlp()
        self.steps = 0

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.steps += 1
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


class ManualNet(Net):
    """Manual optimisation: gradients accumulate over ``accumulate`` batches across epoch ends, and the
    layers are split between ``n_optimizers`` optimizers (SGD with momentum, Adam)."""

    def __init__(self, accumulate: int, n_optimizers: int):
        super().__init__()
        self.automatic_optimization = False
        self.accumulate, self.n_optimizers = accumulate, n_optimizers
        self.batches = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y))
        self.batches += 1
        if self.batches % self.accumulate == 0:
            optimizers = self.optimizers()
            for opt in optimizers if isinstance(optimizers, list) else [optimizers]:
                opt.step()
                opt.zero_grad()

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        first = list(self.model[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return [torch.optim.SGD(first, lr=0.05, momentum=0.9), torch.optim.Adam(rest, lr=0.02)]


class AlignOnce(ReBasinAlign):
    """Aligns at the end of one epoch only, so a run compares with its control by one permutation."""

    def __init__(self, *args, epoch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = epoch

    def should_update(self, epoch: int) -> bool:
        return epoch == self.epoch


class Snapshot(pl.Callback):
    """The model's weights at the end of training batch ``at`` (a global count)."""

    def __init__(self, at: int):
        self.at, self.seen, self.state = at, 0, None
        self.perms = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.at:
            self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            aligner = next((c for c in trainer.callbacks if isinstance(c, ReBasinAlign)), None)
            self.perms = aligner.last_perms if aligner is not None else None


def _trainer(tmp_path: Path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    return pl.Trainer(**{**defaults, **kwargs}, callbacks=callbacks)


def _loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(
        _data(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1)
    )


def _reference() -> nn.Module:
    torch.manual_seed(7)
    return _mlp()


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- weight averaging
def _averaged_run(tmp_path, averaging, aligner):
    net = Net()
    callbacks = [averaging] + ([aligner] if aligner is not None else [])
    _trainer(tmp_path, callbacks, max_epochs=3).fit(net, _loader())
    return net


@pytest.mark.parametrize(
    ("make", "epoch"),
    [
        (lambda: EMAWeightAveraging(decay=0.9), 0),
        (lambda: StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1), 1),
    ],
    ids=["ema", "swa"],
)
def test_averaged_copy_is_permuted_with_the_model(tmp_path, make, epoch):
    # at the end of fitting both callbacks write the average into the model: with the copy permuted too,
    # the aligned run ends at the control's average, permuted
    control = _averaged_run(tmp_path / "c", make(), None)
    aligner = AlignOnce(_reference(), submodule="model", align_kwargs={"steps": 5}, epoch=epoch)
    aligned = _averaged_run(tmp_path / "a", make(), aligner)
    assert len(aligner.history) == 1 and aligner.last_perms is not None
    spec = aligner.spec
    assert any(not torch.equal(p, torch.arange(len(p))) for p in aligner.last_perms.values())
    expected = permute_state_dict(control.model.state_dict(), spec, aligner.last_perms)
    assert _max_diff(aligned.model.state_dict(), expected) < 1e-4


# --------------------------------------------------------------------------- accumulation, several optimizers
@pytest.mark.parametrize(("accumulate", "n_optimizers"), [(2, 1), (2, 2), (1, 2)])
def test_first_step_after_alignment_matches_control(tmp_path, accumulate, n_optimizers):
    # 3 batches per epoch, a step every 2: the alignment at the end of epoch 0 finds batch 2's gradient
    # pending; the step at batch 3 (epoch 1) must be the permuted image of the control's step
    def run(aligner):
        net = ManualNet(accumulate, n_optimizers)
        snap = Snapshot(at=4)
        callbacks = [snap] + ([aligner] if aligner is not None else [])
        _trainer(tmp_path, callbacks, limit_train_batches=3).fit(net, _loader())
        return snap

    control = run(None)
    aligner = AlignOnce(_reference(), submodule="model", align_kwargs={"steps": 5})
    aligned = run(aligner)
    assert aligned.perms is not None
    expected = permute_state_dict(control.state, aligner.spec, aligned.perms)
    assert _max_diff(aligned.state, expected) < 1e-6


# --------------------------------------------------------------------------- sharded strategies
@pytest.mark.parametrize("cls", [ReBasinAlign, LMCMonitor])
def test_sharded_strategy_is_refused_at_setup(tmp_path, cls):
    trainer = _trainer(tmp_path, [])
    trainer._accelerator_connector.strategy = (
        FSDPStrategy()
    )  # FSDP needs GPUs to run; its setup check does not
    net = Net()
    before = copy.deepcopy(net.state_dict())
    callback = cls(_reference(), submodule="model")
    with pytest.raises(
        MisconfigurationException, match=rf"{cls.__name__} does not support sharded.*FSDPStrategy"
    ):
        callback.setup(trainer, net, "fit")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


# --------------------------------------------------------------------------- random state of every kind
class Augmented(Dataset):
    """Noise drawn from Python's ``random`` and NumPy's global generator, as many augmentations do."""

    def __init__(self):
        self.data = _data()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        x = x * random.uniform(0.8, 1.2) + torch.from_numpy(
            np.random.normal(0, 0.1, x.shape).astype("float32")
        )
        return x, y


class Dropout(Net):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (dropout draws from its generator)"
)


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=_CUDA)])
def test_monitor_on_augmented_train_data_leaves_training_unchanged(tmp_path, accelerator):
    def run(callbacks):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)  # seeds CUDA's generators too
        net = Dropout()
        loader = DataLoader(Augmented(), batch_size=16, shuffle=True)
        _trainer(tmp_path, callbacks, max_epochs=3, accelerator=accelerator).fit(net, loader)
        return {k: v.cpu() for k, v in net.model.state_dict().items()}

    control = run([])
    reference = Dropout().model
    monitor = LMCMonitor(
        reference, submodule="model", data="train", n_points=3, align=False, save_dir=str(tmp_path)
    )
    monitored = run([monitor])
    assert len(monitor.results) == 3
    assert _max_diff(monitored, control) == 0.0


# --------------------------------------------------------------------------- endless data
class Endless(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(6, generator=g), torch.randint(0, 3, (), generator=g)


@pytest.mark.timeout(120)
def test_monitor_on_endless_train_data_follows_limit_train_batches(tmp_path):
    monitor = LMCMonitor(
        _reference(), submodule="model", data="train", n_points=3, align=False, save_dir=str(tmp_path)
    )
    net = Net()
    _trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=4).fit(
        net, DataLoader(Endless(), batch_size=8)
    )
    assert len(monitor.results) == 1 and net.steps == 4


@pytest.mark.timeout(120)
def test_monitor_on_endless_train_data_without_limit_is_refused_before_training(tmp_path):
    monitor = LMCMonitor(
        _reference(), submodule="model", data="train", every_n_epochs=0, save_dir=str(tmp_path)
    )
    net = Net()
    with pytest.raises(ValueError, match=r"data='train'.*no length.*max_batches"):
        _trainer(tmp_path, [monitor], max_epochs=-1, max_steps=3).fit(
            net, DataLoader(Endless(), batch_size=8)
        )
    assert net.steps == 0


@pytest.mark.timeout(120)
def test_monitor_with_endless_given_data_needs_max_batches(tmp_path):
    net = Net()
    monitor = LMCMonitor(_reference(), submodule="model", data=DataLoader(Endless(), batch_size=8))
    with pytest.raises(ValueError, match="no length.*max_batches"):
        _trainer(tmp_path, [monitor]).fit(net, _loader())
    assert net.steps == 0
    monitor = LMCMonitor(
        _reference(), submodule="model", data=DataLoader(Endless(), batch_size=8), max_batches=2, n_points=3
    )
    _trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=2).fit(Net(), _loader())
    assert len(monitor.results) == 1


# --------------------------------------------------------------------------- torch.compile
class Compiled(Net):
    def __init__(self):
        super().__init__()
        self.model = torch.compile(self.model, backend="eager")


def test_compiled_submodule_is_aligned_at_every_epoch(tmp_path):
    reference = Compiled()  # a compiled reference module too: its keys carry "_orig_mod."
    assert any("_orig_mod." in k for k in reference.state_dict())
    aligner = ReBasinAlign(reference, submodule="model", align_kwargs={"steps": 5})
    net = Compiled()
    _trainer(tmp_path, [aligner], max_epochs=3, limit_train_batches=2).fit(net, _loader())
    assert len(aligner.history) == 3
    assert all("_orig_mod" not in k for k in aligner.spec.axes_to_perm)
    assert aligner.history[-1]["l2_after"] <= aligner.history[-1]["l2_before"]


@pytest.mark.timeout(120)
def test_monitor_on_endless_val_data_follows_limit_val_batches(tmp_path):
    monitor = LMCMonitor(_reference(), submodule="model", n_points=3, align=False, save_dir=str(tmp_path))
    net = Net()
    net.validation_step = lambda batch, batch_idx: None
    trainer = _trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=2, limit_val_batches=3)
    trainer.fit(net, _loader(), DataLoader(Endless(), batch_size=8))
    assert len(monitor.results) == 1


# --------------------------------------------------------------------------- ReBasinFusion
def test_fusion_refuses_sharded_strategies_and_averaging_in_an_episode(tmp_path):
    from rebasin_callbacks.lightning_fusion import ReBasinFusion

    fusion = ReBasinFusion(alpha=0.8, beta=0.1, submodule="model", example_inputs=torch.zeros(2, 6))
    trainer = _trainer(tmp_path, [fusion])
    trainer._accelerator_connector.strategy = FSDPStrategy()
    with pytest.raises(
        MisconfigurationException, match="ReBasinFusion does not support sharded.*FSDPStrategy"
    ):
        fusion.setup(trainer, Net(), "fit")
    net = Net()
    _trainer(tmp_path, [fusion, EMAWeightAveraging()], max_epochs=1).fit(net, _loader())  # first fit: plain
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(MisconfigurationException, match="EMAWeightAveraging averages the module's weights"):
        _trainer(tmp_path, [fusion, EMAWeightAveraging()], max_epochs=1).fit(net, _loader())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("cls", [ReBasinAlign, LMCMonitor])
def test_compiled_child_of_the_aligned_module_is_named_at_setup(tmp_path, cls):
    net = Compiled()
    net.example_input_array = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"Compiled\.model is a torch.compile'd module.*submodule='model'"):
        _trainer(tmp_path, [cls(Compiled())]).fit(net, _loader())
    assert net.steps == 0


class OwnEMA(Net):
    """Keeps its own exponential moving average of ``model`` (``torch.optim.swa_utils.AveragedModel``)."""

    def __init__(self):
        super().__init__()
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.model)


def test_own_averaged_model_is_permuted_with_the_model(tmp_path):
    control = OwnEMA()
    _trainer(tmp_path, [], max_epochs=2).fit(control, _loader())
    aligner = AlignOnce(_reference(), submodule="model", align_kwargs={"steps": 5})
    aligned = OwnEMA()
    _trainer(tmp_path, [aligner], max_epochs=2).fit(aligned, _loader())
    expected = permute_state_dict(control.ema.module.state_dict(), aligner.spec, aligner.last_perms)
    assert _max_diff(aligned.ema.module.state_dict(), expected) < 1e-4


def test_own_averaged_model_inside_the_aligned_module_is_refused_at_setup(tmp_path):
    net = OwnEMA()
    net.example_input_array = torch.zeros(2, 6)
    reference = OwnEMA()
    with pytest.raises(
        MisconfigurationException, match=r"OwnEMA\.ema is an AveragedModel inside the aligned"
    ):
        _trainer(tmp_path, [ReBasinAlign(reference)]).fit(net, _loader())
    assert net.steps == 0


def test_data_cost_alignment_on_augmented_train_data_leaves_training_unchanged(tmp_path):
    # ReBasinAlign(cost="mid") reads the training dataloader (augmentations draw from random / NumPy);
    # mode="copy" changes no weight, so the run must end exactly where the control does
    def run(callbacks):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        net = Dropout()
        _trainer(tmp_path, callbacks, max_epochs=2).fit(
            net, DataLoader(Augmented(), batch_size=16, shuffle=True)
        )
        return net.model.state_dict()

    control = run([])
    aligner = ReBasinAlign(
        Dropout().model, submodule="model", cost="mid", mode="copy", align_kwargs={"steps": 3}
    )
    aligned = run([aligner])
    assert len(aligner.history) == 2 and aligner.aligned_model is not None
    assert _max_diff(aligned, control) == 0.0
