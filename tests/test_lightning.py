"""Lightning callbacks: reference loading and errors, exact in-place alignment, copies, LMC logging, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from rebasin_callbacks.lightning import (  # noqa: E402
    Evaluator,
    LMCMonitor,
    ReBasinAlign,
    load_reference_state,
    match_reference,
)
from rebasin_callbacks.permute import permute_state_dict  # noqa: E402
from rebasin_callbacks.spec import SpecMismatchError  # noqa: E402


class Tiny(pl.LightningModule):
    """8 -> 16 -> 16 -> 3 MLP classifier; records every training loss."""

    def __init__(self, width: int = 16, lr: float = 0.05):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
        )
        self.lr = lr
        self.losses: list[float] = []
        self.example_input_array = torch.zeros(2, 8)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * F.one_hot(y, 8).float()
    return TensorDataset(x, y)


def _loaders(seed: int = 0, shuffle: bool = True):
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(_data(96, seed), batch_size=16, shuffle=shuffle, generator=gen)
    val = DataLoader(_data(48, seed + 100), batch_size=24)
    return train, val


def _trainer(tmp_path: Path, callbacks=(), max_epochs: int = 3, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def _fit(tmp_path: Path, callbacks=(), seed: int = 1, max_epochs: int = 3, shuffle=True, **kwargs) -> Tiny:
    pl.seed_everything(seed, verbose=False)
    model = Tiny()
    train, val = _loaders(shuffle=shuffle)
    _trainer(tmp_path, callbacks, max_epochs, **kwargs).fit(model, train, val)
    return model


def _reference(seed: int = 123) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().model


# ----------------------------------------------------------------------------- reference loading
def test_load_reference_state_from_module_dict_and_files(tmp_path):
    ref = _reference()
    expected = ref.state_dict()
    plain = tmp_path / "plain.pt"
    torch.save(expected, plain)
    for source in (ref, dict(expected), plain, str(plain)):
        got = load_reference_state(source)
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_lightning_checkpoint_prefix_is_matched(tmp_path):
    model = _fit(tmp_path, max_epochs=1)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    state = load_reference_state(ckpt)
    assert all(k.startswith("model.") for k in state)
    matched = match_reference(state, Tiny().model)
    assert torch.equal(matched["0.weight"], model.model[0].weight)


@pytest.mark.parametrize(
    "content, error, words",
    [
        (None, FileNotFoundError, ["reference", "missing.pt"]),
        ([1, 2, 3], ValueError, ["not a state dict", "list"]),
        ({"a": torch.zeros(1), "b": 3}, ValueError, ["'b'", "int"]),
        (b"not a checkpoint", ValueError, ["weights_only"]),
    ],
)
def test_bad_reference_files(tmp_path, content, error, words):
    path = tmp_path / "missing.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error) as info:
        load_reference_state(path)
    for word in words:
        assert word in str(info.value)


def test_mismatching_reference_names_key_and_shapes():
    wide = Tiny(width=32).model.state_dict()
    with pytest.raises(SpecMismatchError, match=r"'0.weight'.*\(32, 8\).*\(16, 8\)"):
        match_reference(wide, Tiny().model)
    renamed = {"x." + k: v for k, v in Tiny().model.state_dict().items() if k != "4.bias"}
    with pytest.raises(SpecMismatchError, match="4.bias"):
        match_reference(renamed, Tiny().model)


# ----------------------------------------------------------------------------- errors at setup
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(reference=Tiny(width=32)), SpecMismatchError, "has shape"),
        (dict(reference="does/not/exist.ckpt"), FileNotFoundError, "does/not/exist.ckpt"),
        (dict(reference=Tiny(), submodule="backbone"), AttributeError, "submodule='backbone'"),
    ],
)
@pytest.mark.parametrize("callback", [ReBasinAlign, LMCMonitor])
def test_errors_are_raised_at_setup_before_training(tmp_path, callback, kwargs, error, match):
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    train, val = _loaders()
    with pytest.raises(error, match=match):
        _trainer(tmp_path, [callback(**kwargs)]).fit(model, train, val)
    assert model.losses == []  # no training step ran


def test_lmc_monitor_without_val_loader_fails_at_setup(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Tiny()
    train, val = _loaders()
    with pytest.raises(ValueError, match="no validation dataloader"):
        _trainer(tmp_path, [LMCMonitor(Tiny().model, submodule="model")]).fit(model, train)
    assert model.losses == []  # no training step ran
    # with a val loader, or with data="train", the same fit runs
    _trainer(tmp_path, [LMCMonitor(Tiny().model, submodule="model")], max_epochs=1).fit(model, train, val)
    _trainer(tmp_path, [LMCMonitor(Tiny().model, submodule="model", data="train")], max_epochs=1).fit(
        Tiny(), train
    )


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode"):
        ReBasinAlign(Tiny(), mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_epochs"):
        ReBasinAlign(Tiny(), every_n_epochs=-1)
    with pytest.raises(ValueError, match="never"):
        ReBasinAlign(Tiny(), every_n_epochs=0)
    with pytest.raises(ValueError, match="n_points"):
        LMCMonitor(Tiny(), n_points=1)
    with pytest.raises(ValueError, match="data must be"):
        LMCMonitor(Tiny(), data="test")


# ----------------------------------------------------------------------------- ReBasinAlign
def test_inplace_alignment_leaves_training_unchanged(tmp_path):
    plain = _fit(tmp_path)
    ref = _reference()
    cb = ReBasinAlign(ref, submodule="model", every_n_epochs=1)
    aligned = _fit(tmp_path, [cb])
    # the loss trajectory is that of the run without the callback (a permutation changes no function)
    assert len(aligned.losses) == len(plain.losses) > 0
    torch.testing.assert_close(torch.tensor(aligned.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-5)
    x = _data(32, seed=7).tensors[0]
    torch.testing.assert_close(aligned(x), plain(x), rtol=1e-4, atol=1e-5)
    # ... but the weights were permuted towards the reference
    assert len(cb.history) == 3
    assert all(h["l2_after"] <= h["l2_before"] + 1e-6 for h in cb.history)
    assert cb.history[0]["l2_after"] < cb.history[0]["l2_before"] - 1e-3
    assert not torch.allclose(aligned.model[0].weight, plain.model[0].weight)


def test_inplace_alignment_permutes_optimizer_state(tmp_path):

    def run(callbacks):
        pl.seed_everything(1, verbose=False)
        model = Tiny()
        trainer = _trainer(tmp_path, callbacks, max_epochs=1)
        trainer.fit(model, *_loaders())
        return model, trainer.optimizers[0]

    plain, plain_opt = run([])
    cb = ReBasinAlign(_reference(), submodule="model")
    model, opt = run([cb])
    assert cb.history[0]["l2_after"] < cb.history[0]["l2_before"]  # the weights were permuted
    for name in ("exp_avg", "exp_avg_sq"):
        # Adam's moments moved exactly like the weights they belong to
        moments = {k: plain_opt.state[p][name] for k, p in plain.model.named_parameters()}
        expected = permute_state_dict(moments, cb.spec, cb.last_perms)
        for k, p in model.model.named_parameters():
            torch.testing.assert_close(opt.state[p][name], expected[k], rtol=1e-4, atol=1e-7)


class Stem(Tiny):
    """The aligned submodule gets other inputs than the batch: 8 features -> fixed stem -> 6 -> model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 6)
        self.model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.model(torch.tanh(self.stem(x)))


def test_submodule_spec_is_traced_on_its_own_inputs(tmp_path):
    torch.manual_seed(5)
    reference = Stem().model
    cb = ReBasinAlign(reference, submodule="model")
    pl.seed_everything(1, verbose=False)
    model = Stem()
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, *_loaders())
    assert cb.spec is not None and list(cb.spec.sizes.values()) == [16]
    assert cb.history[0]["l2_after"] < cb.history[0]["l2_before"]


@pytest.mark.parametrize("source", ["spec", "function", "json"])
def test_every_spec_source_is_resolved_once_and_the_given_spec_is_kept(tmp_path, source):
    """A spec, a function of the module and a JSON path all resolve to the same bound spec; the user's spec
    object is not modified (sizes are bound on a new one)."""
    from rebasin_callbacks.spec import PermutationSpec

    given = PermutationSpec.from_axes({"0.weight": ("P", None), "0.bias": ("P",), "2.weight": (None, "P")})
    calls = []
    path = tmp_path / "spec.json"
    given.to_json(str(path))
    spec = {"spec": given, "function": lambda m: calls.append(m) or given, "json": str(path)}[source]
    cb = ReBasinAlign(_reference(), submodule="model", spec=spec, align_kwargs={"steps": 3})
    model = _fit(tmp_path, [cb], max_epochs=2)
    assert given.sizes == {}
    assert cb.spec is not None and cb.spec is not given and cb.spec.sizes == {"P": 16}
    assert len(cb.history) == 2 and cb.history[-1]["l2_after"] <= cb.history[-1]["l2_before"]
    if source == "function":
        assert calls == [model.model]  # resolved once, on the aligned submodule


def test_copy_mode_keeps_training_weights_and_saves_the_copy(tmp_path):
    plain = _fit(tmp_path)
    cb = ReBasinAlign(_reference(), submodule="model", mode="copy", every_n_epochs=0, at_fit_end=True)
    model = _fit(tmp_path, [cb])
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert cb.aligned_model is not None and len(cb.history) == 1
    x = _data(32, seed=7).tensors[0]
    torch.testing.assert_close(cb.aligned_model(x), model.model(x), rtol=1e-4, atol=1e-5)
    state = cb.state_dict()
    restored = ReBasinAlign(_reference(), submodule="model", mode="copy", every_n_epochs=0, at_fit_end=True)
    restored.load_state_dict(torch.load(_save(tmp_path, state), weights_only=True))
    assert restored.history == cb.history
    assert torch.equal(restored._pending_aligned_state["0.weight"], cb.aligned_model[0].weight)


def _save(tmp_path: Path, obj) -> Path:
    path = tmp_path / "state.pt"
    torch.save(obj, path)
    return path


def test_logged_metrics_reach_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = ReBasinAlign(_reference(), submodule="model")
    monitor = LMCMonitor(_reference(), submodule="model", n_points=3, save_dir=str(tmp_path / "figs"))
    logger = CSVLogger(str(tmp_path), name="log", version="")
    _fit(tmp_path, [cb, monitor], max_epochs=2, logger=logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    columns = set(rows[0])
    for name in ("rebasin/l2_before", "rebasin/l2_after", "rebasin/align_seconds"):
        assert name in columns
    for name in ("lmc/naive_barrier", "lmc/naive_auc", "lmc/rebasin_barrier", "lmc/rebasin_auc"):
        assert name in columns
        assert sum(1 for r in rows if r[name]) == 2  # once per epoch
    assert sorted(p.name for p in (tmp_path / "figs").glob("*.png")) == ["lmc_epoch0.png", "lmc_epoch1.png"]


def test_tensorboard_gets_scalars_and_the_figure(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    monitor = LMCMonitor(_reference(), submodule="model", n_points=3, save_dir=str(tmp_path / "png"))
    _fit(tmp_path, [monitor], max_epochs=1, logger=logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "lmc" in events.Tags()["images"]
    assert {"lmc/naive_barrier", "lmc/rebasin_auc"} <= set(events.Tags()["scalars"])
    assert not (tmp_path / "png").exists()  # the figure went to TensorBoard, not to a PNG


# ----------------------------------------------------------------------------- LMCMonitor
def test_lmc_monitor_does_not_touch_training_or_validation(tmp_path):
    from lightning.pytorch.callbacks import Callback

    class Record(Callback):
        def __init__(self):
            self.val = []

        def on_validation_epoch_end(self, trainer, pl_module):
            self.val.append(float(trainer.callback_metrics["val_loss"]))

    plain_rec, rec = Record(), Record()
    plain = _fit(tmp_path, [plain_rec])
    monitor = LMCMonitor(_reference(), n_points=4, save_dir=str(tmp_path))
    model = _fit(tmp_path, [monitor, rec])
    assert model.losses == plain.losses
    assert rec.val == plain_rec.val
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert len(monitor.results) == 3
    naive, rebased = monitor.results[-1]["naive"], monitor.results[-1]["rebasin"]
    assert len(naive.lambdas) == 4
    # the endpoints are the same two functions, so they have the same loss naive or re-based
    assert naive.values["loss"][0] == pytest.approx(rebased.values["loss"][0], rel=1e-4)
    assert naive.values["loss"][-1] == pytest.approx(rebased.values["loss"][-1], rel=1e-4)
    state = monitor.state_dict()
    other = LMCMonitor(_reference())
    other.load_state_dict(state)
    assert other.history == monitor.history and len(other.history) == 3


def test_evaluator_counts_loss_and_accuracy():
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    got = Evaluator([(x[:6], y[:6]), (x[6:], y[6:])])(model)
    with torch.no_grad():
        out = model(x)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert got["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        Evaluator([x])(model)


# ----------------------------------------------------------------------------- resume
def test_resume_from_checkpoint_continues_identically(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks():
        return [
            ReBasinAlign(_reference(), submodule="model"),
            LMCMonitor(_reference(), n_points=3, save_dir=str(tmp_path)),
        ]

    # a shuffling DataLoader's generator is not checkpointed by Lightning: fixed order here
    full = _fit(tmp_path / "full", callbacks(), max_epochs=4, shuffle=False)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    _fit(tmp_path / "first", [*callbacks(), ckpt_cb], max_epochs=2, shuffle=False, enable_checkpointing=True)
    cbs = callbacks()
    pl.seed_everything(1, verbose=False)
    resumed = Tiny()
    train, val = _loaders(shuffle=False)
    _trainer(tmp_path / "second", cbs, max_epochs=4).fit(
        resumed, train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert [h["epoch"] for h in cbs[0].history] == [0, 1, 2, 3]  # restored history + two new alignments
    assert len(cbs[1].history) == 4
    for a, b in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- command line
def test_cli_demo_smoke(tmp_path, capsys):
    from rebasin_callbacks.cli import main

    assert main(["demo", "--smoke", "--no-progress", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for label in ("naive", "re-based", "weight matching", "loss barrier"):
        assert label in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["lmc"]) == {
        "naive",
        "re-based (Sinkhorn)",
        "Sinkhorn, identity init",
        "weight matching",
    }
    # every curve joins the same two functions (B permuted, A): same endpoints
    ends = {label: (c["values"]["loss"][0], c["values"]["loss"][-1]) for label, c in results["lmc"].items()}
    for first, last in ends.values():
        assert first == pytest.approx(ends["naive"][0], rel=1e-4) and last == pytest.approx(
            ends["naive"][1], rel=1e-4
        )
    assert (tmp_path / "demo" / "lmc.png").stat().st_size > 1000
    assert results["monitor"]  # LMCMonitor ran during training of model B
    # one row per epoch, with the training metrics and the monitor's barriers side by side
    with open(tmp_path / "demo" / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(results["config"]["epochs"])]
    assert rows[0]["train_loss"] and rows[0]["lmc/naive_barrier"] and rows[0]["val_loss"]
    assert results["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_figures_go_through_the_loggers_image_api(tmp_path):
    from lightning.pytorch.loggers import Logger

    class ImageLogger(Logger):
        def __init__(self):
            super().__init__()
            self.images: list = []
            self.rows: list = []

        @property
        def name(self):
            return "images"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append(dict(metrics))

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, images, step))

    logger = ImageLogger()
    monitor = LMCMonitor(_reference(), submodule="model", n_points=3, save_dir=str(tmp_path / "png"))
    _fit(tmp_path, [monitor], max_epochs=2, logger=logger)
    assert [key for key, _, _ in logger.images] == ["lmc", "lmc"]
    image = logger.images[0][1][0]
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8" and image.std() > 0
    assert not (tmp_path / "png").exists()  # no PNG fallback when the logger takes images


def test_cli_without_command_prints_help(capsys):
    from rebasin_callbacks.cli import main

    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


# ----------------------------------------------------------------------------- composition
def _count_alignments(monkeypatch) -> list[int]:
    import importlib

    align_module = importlib.import_module("rebasin_callbacks.align")  # the package's `align` is the function

    calls: list[int] = []
    real = align_module.align

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(align_module, "align", counting)
    return calls


@pytest.mark.parametrize("align_first", [True, False])
def test_align_and_monitor_share_one_alignment_naive_is_before_it(tmp_path, monkeypatch, align_first):
    calls = _count_alignments(monkeypatch)
    alone = LMCMonitor(_reference(), submodule="model", n_points=3, save_dir=str(tmp_path))
    _fit(tmp_path, [alone], max_epochs=2)
    assert len(calls) == 2  # the monitor alone aligns once per epoch
    calls.clear()
    aligner = ReBasinAlign(_reference(), submodule="model")
    monitor = LMCMonitor(_reference(), submodule="model", n_points=3, save_dir=str(tmp_path))
    _fit(tmp_path, [aligner, monitor] if align_first else [monitor, aligner], max_epochs=2)
    assert len(calls) == 2  # one alignment per epoch, shared by the two callbacks
    for res in monitor.results:
        assert res["naive"].values["loss"] != pytest.approx(res["rebasin"].values["loss"], rel=1e-3)
        assert res["rebasin_source"] == ("ReBasinAlign" if align_first else "LMCMonitor")
    # epoch 0: both runs trained identically, so "naive" is the same model: the one before the alignment
    first, ref_first = monitor.results[0], alone.results[0]
    assert first["naive"].values["loss"] == pytest.approx(ref_first["naive"].values["loss"], rel=1e-5)
    assert first["rebasin"].values["loss"] == pytest.approx(ref_first["rebasin"].values["loss"], rel=1e-4)
    assert aligner.history[0]["l2_after"] < aligner.history[0]["l2_before"]


def test_inplace_alignment_guarantee_function_and_optimizer_state(tmp_path):
    """At the moment of alignment: same function (round-off only), optimizer state exactly permuted."""
    from lightning.pytorch.callbacks import Callback

    x = _data(32, seed=7).tensors[0]

    class Snapshot(Callback):
        def __init__(self):
            self.outputs, self.moments = [], []

        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                self.outputs.append(pl_module(x).clone())
            opt = trainer.optimizers[0]
            self.moments.append(
                {
                    k: {n: v.clone() for n, v in opt.state[p].items()}
                    for k, p in pl_module.model.named_parameters()
                }
            )

    before, after = Snapshot(), Snapshot()
    cb = ReBasinAlign(_reference(), submodule="model")
    model = _fit(tmp_path, [before, cb, after], max_epochs=1)
    assert cb.history[0]["l2_after"] < cb.history[0]["l2_before"] - 1e-3  # the weights did move
    torch.testing.assert_close(after.outputs[0], before.outputs[0], rtol=1e-5, atol=1e-6)
    for name in ("exp_avg", "exp_avg_sq"):
        moments = {k: m[name] for k, m in before.moments[0].items()}
        expected = permute_state_dict(moments, cb.spec, cb.last_perms)
        for k in moments:
            assert torch.equal(after.moments[0][k][name], expected[k]), (k, name)  # exact, not close
        assert any(not torch.equal(after.moments[0][k][name], moments[k]) for k in moments)
    for k, m in before.moments[0].items():
        assert torch.equal(after.moments[0][k]["step"], m["step"])
    assert model.losses  # trained


class TinyBN(Tiny):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
        )


def _fit_bn(tmp_path: Path, callbacks=(), max_epochs: int = 3) -> TinyBN:
    pl.seed_everything(1, verbose=False)
    model = TinyBN()
    train, val = _loaders(shuffle=True)  # shuffled by the DataLoader's own generator
    _trainer(tmp_path, callbacks, max_epochs=max_epochs).fit(model, train, val)
    return model


def test_monitor_on_train_loader_with_bn_reset_does_not_change_training(tmp_path):
    def run(callbacks):
        return _fit_bn(tmp_path, callbacks)

    plain = run([])
    torch.manual_seed(3)
    reference = TinyBN().model
    monitor = LMCMonitor(reference, submodule="model", data="train", reset_bn=True, n_points=3)
    monitored = run([monitor])
    assert len(monitor.results) == 3
    assert monitored.losses == plain.losses  # identical, not close
    for a, b in zip(monitored.parameters(), plain.parameters()):
        assert torch.equal(a, b)


class DictTiny(Tiny):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["label"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["image"], batch["label"]), batch_idx)


class _DictData(torch.utils.data.Dataset):
    def __init__(self, base, keys=("image", "label")):
        self.base, self.keys = base, keys

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {self.keys[0]: x, self.keys[1]: y}


def test_monitor_with_dict_batches(tmp_path):
    monitor = LMCMonitor(_reference(), submodule="model", n_points=3, save_dir=str(tmp_path))
    pl.seed_everything(1, verbose=False)
    train = DataLoader(_DictData(_data(96)), batch_size=16)
    val = DataLoader(_DictData(_data(48, 100)), batch_size=24)
    _trainer(tmp_path, [monitor], max_epochs=1).fit(DictTiny(), train, val)
    assert len(monitor.results) == 1 and monitor.results[0]["naive"].values["accuracy"]


def test_resume_with_changed_every_n_epochs_restores_and_warns(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    first = [
        ReBasinAlign(_reference(), submodule="model", every_n_epochs=1),
        LMCMonitor(_reference(), n_points=3, every_n_epochs=1, save_dir=str(tmp_path)),
    ]
    _fit(tmp_path / "a", [*first, ckpt_cb], max_epochs=2, shuffle=False, enable_checkpointing=True)
    second = [
        ReBasinAlign(_reference(), submodule="model", every_n_epochs=2),
        LMCMonitor(_reference(), n_points=3, every_n_epochs=2, save_dir=str(tmp_path)),
    ]
    pl.seed_everything(1, verbose=False)
    train, val = _loaders(shuffle=False)
    with pytest.warns(UserWarning, match=r"every_n_epochs=1 -> 2"):
        _trainer(tmp_path / "b", second, max_epochs=4).fit(
            Tiny(), train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert [h["epoch"] for h in second[0].history] == [0, 1, 3]  # restored two, then every 2nd epoch
    assert [h["epoch"] for h in second[1].history] == [0.0, 1.0, 3.0]


@pytest.mark.parametrize("progress, bar", [(True, True), (False, True), (True, False)])
def test_progress_inside_the_callbacks_work(tmp_path, monkeypatch, progress, bar):
    import importlib

    align_module = importlib.import_module("rebasin_callbacks.align")
    lmc_module = importlib.import_module("rebasin_callbacks.lmc")
    seen: dict[str, list] = {"align": [], "lmc": []}
    real_align, real_curve = align_module.align, lmc_module.lmc_curve

    def spy_align(*args, **kwargs):
        seen["align"].append(kwargs.get("progress"))
        return real_align(*args, **kwargs)

    def spy_curve(*args, **kwargs):
        seen["lmc"].append(kwargs.get("progress"))
        return real_curve(*args, **kwargs)

    monkeypatch.setattr(align_module, "align", spy_align)
    monkeypatch.setattr(lmc_module, "lmc_curve", spy_curve)
    callbacks = [
        ReBasinAlign(_reference(), submodule="model", progress=progress, threads=1),
        LMCMonitor(_reference(7), submodule="model", n_points=3, progress=progress, save_dir=str(tmp_path)),
    ]
    before = torch.get_num_threads()
    _fit(tmp_path, callbacks, max_epochs=1, enable_progress_bar=bar)
    assert torch.get_num_threads() == before  # the cap is lifted after the callback's work
    shown = progress and bar
    assert seen["align"] and all(p is shown for p in seen["align"])
    assert seen["lmc"] and all(p is shown for p in seen["lmc"])


def test_should_update_is_the_overridable_schedule(tmp_path):
    class OddEpochs(LMCMonitor):
        def should_update(self, epoch: int) -> bool:
            return epoch % 2 == 1

    default = LMCMonitor(_reference(), submodule="model", n_points=2, every_n_epochs=2, progress=False)
    odd = OddEpochs(_reference(), submodule="model", n_points=2, progress=False)
    assert [default.should_update(e) for e in range(4)] == [False, True, False, True]
    _fit(tmp_path, [odd], max_epochs=4)
    assert [r["epoch"] for r in odd.results] == [1, 3]


def test_data_cost_uses_the_training_loader_and_leaves_training_unchanged(tmp_path):
    def run(callbacks):
        return _fit_bn(tmp_path, callbacks, max_epochs=2)

    plain = run([])
    torch.manual_seed(3)
    cb = ReBasinAlign(
        TinyBN().model, submodule="model", cost="mid", mode="copy", align_kwargs={"steps": 3, "seed": 0}
    )
    trained = run([cb])
    assert len(cb.history) == 2 and cb.aligned_model is not None  # no data passed: the training loader
    assert trained.losses == plain.losses  # identical: the loader's generator state was restored
    x = _data(32, seed=7).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(cb.aligned_model.eval()(x), trained.model.eval()(x), rtol=1e-4, atol=1e-5)


def test_alignments_are_read_only_from_the_callbacks_that_share_them(tmp_path):
    """Another callback that happens to have an ``_alignments`` attribute is neither read nor changed."""

    class Other(pl.Callback):
        def __init__(self):
            self._alignments = ["not ours"]

    other = Other()
    cb = ReBasinAlign(_reference(), submodule="model", align_kwargs={"steps": 3})
    monitor = LMCMonitor(_reference(), submodule="model", n_points=3, save_dir=str(tmp_path))
    _fit(tmp_path, [other, cb, monitor], max_epochs=1)
    assert other._alignments == ["not ours"]
    assert monitor.results[-1]["rebasin_source"] == "ReBasinAlign"


def test_fit_end_work_is_numbered_as_the_last_epoch(tmp_path):
    """After the loop Lightning's counter is one past the last epoch: an alignment or a curve made at fit end
    belongs to the last epoch (0-based, as in the loggers' rows and the demo's epochs.csv), not to the next."""
    align = ReBasinAlign(_reference(), submodule="model", mode="copy", every_n_epochs=0, at_fit_end=True)
    monitor = LMCMonitor(_reference(), submodule="model", data=_loaders()[1], every_n_epochs=0, n_points=3)
    _fit(tmp_path, [align, monitor], max_epochs=2)
    assert [r["epoch"] for r in align.history] == [1]
    assert monitor.results[-1]["epoch"] == 1 and monitor.history[-1]["epoch"] == 1.0
