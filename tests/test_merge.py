"""merge(): N models into one basin. Planted permutations recovered exactly, N = 2 equal to align(), the
refinements never worse than their warm start, the merged model and its evaluation, the CLI and the
benchmark's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rebasin_callbacks import (
    align,
    average_models,
    cli,
    evaluate_merge,
    merge,
    permute,
    random_permutations,
    trace_spec,
)
from rebasin_callbacks.merge_matching import compose, distance_to_mean, invert, merge_many

ROOT = Path(__file__).resolve().parent.parent


def _mlp(width: int = 24) -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    )


def _cnn(width: int = 6) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3),
    )  # fmt: skip


def _task(n: int = 256, seed: int = 0, image: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable 3-class problem: the class is the argmax of three fixed projections of the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g) if image else torch.randn(n, 8, generator=g)
    proj = torch.randn(x[0].numel(), 3, generator=torch.Generator().manual_seed(99))
    y = (x.flatten(1) @ proj).argmax(1)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]


def _train(model: nn.Module, data, seed: int, epochs: int = 15) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("method", ["star", "merge_many", "data_free", "data"])
def test_three_planted_permutations_are_recovered_exactly(method):
    torch.manual_seed(0)
    base = _cnn() if method == "data" else _mlp()
    x = torch.randn(2, 1, 6, 6) if method == "data" else torch.randn(2, 8)
    spec = trace_spec(base, x)
    planted = [random_permutations(spec, seed) for seed in (1, 2, 3)]
    models = [permute(base, spec, p) for p in planted]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    data = _task(128, image=True) if method == "data" else None
    result = merge(models, spec=spec, method=method, data=data, steps=5, progress=False)
    for i, p in enumerate(planted):  # model i into model 0's frame: undo p_i, then apply p_0
        expected = compose(spec, invert(spec, p), planted[0])
        assert all(torch.equal(result.perms[i][g], expected[g]) for g in spec.groups), (method, i)
        assert _states_equal(result.models[i], models[0])
    for k, v in result.merged.state_dict().items():  # the average of three equal models (round-off only)
        torch.testing.assert_close(v, models[0].state_dict()[k], rtol=1e-6, atol=1e-7)
    assert result.cycle_error() == 0.0
    assert result.history["distance"][-1] == pytest.approx(0.0, abs=1e-12)
    for m, state in zip(models, before):  # the inputs are never modified
        assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("seed", [0, 1])
def test_two_models_give_the_permutations_of_align(seed):
    data = _task(256)
    a, b = _train(_mlp(), data, 2 * seed), _train(_mlp(), data, 2 * seed + 1)
    spec = trace_spec(a, torch.randn(2, 8))
    expected = align(b, a, spec=spec, seed=seed, progress=False)
    result = merge([a, b], spec=spec, seed=seed, progress=False)
    assert all(torch.equal(result.perms[0][g], torch.arange(spec.sizes[g])) for g in spec.groups)
    assert all(torch.equal(result.perms[1][g], expected.perms[g]) for g in spec.groups)
    assert _states_equal(result.models[1], expected.model)


def test_refinements_never_worse_than_merge_many_and_every_aligned_model_keeps_its_function():
    data = _task(256)
    models = [_train(_mlp(), data, seed) for seed in range(4)]
    spec = trace_spec(models[0], torch.randn(2, 8))
    states = [m.state_dict() for m in models]
    w = [0.25] * 4
    keys = [k for k in states[0] if k in spec.axes_to_perm]
    mm = merge_many(states, spec, w, seed=0)
    mm_distance = distance_to_mean([permute(s, spec, p) for s, p in zip(states, mm)], w, keys)
    free = merge(models, spec=spec, method="data_free", progress=False)
    assert free.history["best_cost"][-1] <= free.history["init_cost"][0]
    params_distance = distance_to_mean([m.state_dict() for m in free.models], w, keys)
    assert params_distance <= mm_distance + 1e-9
    driven = merge(models, spec=spec, method="data", data=data, steps=20, progress=False)
    assert driven.history["best_cost"][-1] <= driven.history["init_cost"][0]
    x = torch.randn(16, 8)
    with torch.no_grad():
        for result in (free, driven):
            for m, aligned in zip(models, result.models):
                torch.testing.assert_close(aligned(x), m(x), rtol=1e-5, atol=1e-5)
    assert free.cycle_error() == 0.0 and driven.cycle_error() == 0.0
    # aligned models are closer to their mean than the unaligned ones
    assert free.history["distance"][-1] < free.history["distance"][0]


def test_merged_model_weights_reset_bn_and_repair_and_the_evaluation():
    data = _task(256, image=True)
    models = [_train(_cnn(), data, seed, epochs=5) for seed in range(3)]
    result = merge(models, example_inputs=data[0][0][:2], method="merge_many", weights=[2, 1, 1],
                   progress=False)  # fmt: skip
    assert result.weights == pytest.approx([0.5, 0.25, 0.25])
    expected = 0.5 * result.models[0][0].weight + 0.25 * (
        result.models[1][0].weight + result.models[2][0].weight
    )
    torch.testing.assert_close(result.merged[0].weight, expected)
    reset = merge(models, example_inputs=data[0][0][:2], method="merge_many", data=data, reset_bn=True,
                  progress=False)  # fmt: skip
    assert not torch.equal(reset.merged[1].running_var, average_models(reset.models)[1].running_var)
    repaired = merge(models, example_inputs=data[0][0][:2], method="merge_many", data=data, reset_bn=True,
                     repair=True, progress=False)  # fmt: skip
    ev = repaired.evaluate(data)
    assert len(ev.models) == 3 and set(ev.merged) == {"loss", "accuracy"}
    assert ev.barrier == pytest.approx(ev.merged["loss"] - sum(m["loss"] for m in ev.models) / 3)
    # REPAIR gives every unit the mean of the aligned models' statistics on the data it used
    same = evaluate_merge(models, models[0], data)  # a "merge" equal to model 0: barrier = loss_0 - mean
    assert same.merged["loss"] == pytest.approx(same.models[0]["loss"])


def test_the_ensemble_averages_logits_and_equal_models_have_no_barrier():
    data = _task(128)
    m = _train(_mlp(), data, 0, epochs=3)
    ev = evaluate_merge([m, m, m], average_models([m, m, m]), data)
    assert ev.barrier == pytest.approx(0.0, abs=1e-6)
    assert ev.ensemble["loss"] == pytest.approx(ev.models[0]["loss"], rel=1e-6)
    other = _train(_mlp(), data, 1, epochs=3)
    ev2 = evaluate_merge([m, other], m, data)
    with torch.no_grad():
        logits = torch.cat([(m(x) + other(x)) / 2 for x, _ in data])
    targets = torch.cat([y for _, y in data])
    assert ev2.ensemble["loss"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)


# ------------------------------------------------------------------------------------------------ CLI
MODELS = textwrap.dedent(
    """
    import torch

    def mlp(num_classes=10):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, num_classes))
    """
)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "merge_models.py").write_text(MODELS)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    spec = trace_spec(base, torch.randn(2, 64))
    paths = []
    for i in range(3):
        m = permute(base, spec, random_permutations(spec, i + 1))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = tmp_path / f"m{i}.pt"
        if i == 2:  # a Lightning-style checkpoint
            torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}}, path)
        else:
            torch.save(m.state_dict(), path)
        paths.append(path)
    return tmp_path, base, paths


def test_cli_merges_three_checkpoints_and_writes_every_output(checkpoints, capsys):
    tmp, base, paths = checkpoints
    stamps = [p.stat().st_mtime_ns for p in paths]
    (tmp / "aligned").mkdir()
    code = cli.main(["merge", *map(str, paths), "--arch", "merge_models:mlp", "--input-shape", "64", "--out",
                     "merged.pt", "--perms", "perms.pt", "--json", "summary.json", "--aligned-dir", "aligned",
                     "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "saved: merged.pt" in out and "merging 3 models" in out
    merged = torch.load(tmp / "merged.pt", weights_only=True)
    # the planted permutations are undone: the merged weights are base's (in model 0's frame) up to the noise
    first = torch.load(paths[0], weights_only=True)
    assert float((merged["1.weight"] - first["1.weight"]).abs().max()) < 0.05
    summary = json.loads((tmp / "summary.json").read_text())
    assert summary["cycle_error"] == 0.0 and summary["function_rel_error"] < 1e-5
    assert summary["distance_after"] < 0.1 * summary["distance_before"]
    assert len(torch.load(tmp / "perms.pt", weights_only=True)) == 3
    assert sorted(p.name for p in (tmp / "aligned").iterdir()) == [
        "aligned_0.pt",
        "aligned_1.pt",
        "aligned_2.pt",
    ]
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # inputs never written


def test_cli_data_driven_merge_with_repair_prints_the_evaluation(checkpoints, capsys):
    tmp, _, paths = checkpoints
    code = cli.main(["merge", *map(str, paths), "--arch", "merge_models:mlp", "--input-shape", "64", "--method",
                     "data", "--data", "digits", "--steps", "3", "--repair", "--max-batches", "2", "--out",
                     "merged.pt", "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "model 3: loss" in out and "barrier" in out and "ensemble" in out
    assert (tmp / "merged.pt").is_file()


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_smoke_runs_every_method_with_reset_and_repair(tmp_path):
    out = tmp_path / "merge.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "merge.py"), "--smoke", "--families", "resnet_bn",
         "--no-pairwise", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    for method in ("naive", "star", "merge_many", "data_free", "data", "data+reset", "data+repair"):
        assert f"| {method} |" in table
    assert "resnet_bn" in table and "| naive+repair |" in table


@pytest.mark.slow
def test_benchmark_mlp_three_models_meets_the_data_driven_target(tmp_path):
    out = tmp_path / "merge.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "merge.py"), "--families", "mlp", "--n", "3",
         "--train-size", "5000", "--test-size", "2000", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "data barrier" in text and "MISSED" not in text, text


# ------------------------------------------------------------------------------------------------ Lightning
def _lit(seed: int):
    import lightning.pytorch as pl

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.model = _mlp()

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Lit()


def _fit(module, callbacks, tmp_path, epochs: int = 2, logger=False):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    data = _task(256)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    loader = DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         deterministic=True)  # fmt: skip
    trainer.fit(module, loader, val)
    return trainer


def test_lightning_merge_leaves_training_unchanged_and_logs_the_merged_model(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from rebasin_callbacks.lightning_merge import ReBasinMerge

    data = _task(256)
    others = [_train(_mlp(), data, seed, epochs=5) for seed in (10, 11)]
    plain = _lit(0)
    _fit(plain, [], tmp_path / "plain")
    merged = _lit(0)
    callback = ReBasinMerge(others, submodule="model", every_n_epochs=1, method="merge_many")
    _fit(merged, [callback], tmp_path / "merged", logger=CSVLogger(tmp_path / "logs"))
    assert _states_equal(plain.model, merged.model)  # the trained model is only read
    assert callback.merges == 3  # after each of the 2 epochs and at fit end
    assert set(callback.metrics) >= {
        "merge/loss",
        "merge/accuracy",
        "merge/barrier",
        "merge/ensemble_accuracy",
    }
    rows = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text()
    assert "merge/loss" in rows.splitlines()[0]
    assert callback.merged_model is not None and not _states_equal(callback.merged_model, merged.model)
    # the merged model is the merge of the trained model with the others
    expected = merge([merged.model, *others], spec=callback.spec, method="merge_many", progress=False)
    assert _states_equal(callback.merged_model, expected.merged)


def test_lightning_merge_writes_back_only_when_asked_and_refuses_bad_others_at_setup(tmp_path):
    from rebasin_callbacks.lightning_merge import ReBasinMerge

    data = _task(256)
    others = [_train(_mlp(), data, 10, epochs=5)]
    module = _lit(0)
    callback = ReBasinMerge(others, submodule="model", write_back=True, method="merge_many")
    _fit(module, [callback], tmp_path, epochs=1)
    assert callback.merged_model is not None and _states_equal(module.model, callback.merged_model)
    # the merged weights travel in the callback's checkpoint state and come back on resume
    resumed = ReBasinMerge(others, submodule="model")
    resumed.load_state_dict(callback.state_dict())
    resumed.on_train_start(None, _lit(5))  # type: ignore[arg-type]
    assert resumed.merges == 1 and _states_equal(resumed.merged_model, callback.merged_model)

    bad = ReBasinMerge([_mlp(width=16)], submodule="model")
    fresh = _lit(0)
    with pytest.raises(ValueError, match="others\\[0\\]"):
        _fit(fresh, [bad], tmp_path / "bad", epochs=1)
    assert _states_equal(fresh.model, _lit(0).model)  # nothing trained: refused at setup


@pytest.mark.parametrize("argv", [["merge", "--help"], ["merge", "a.pt", "--arch", "m:f", "--out", "o.pt"]])
def test_cli_help_and_usage_errors_do_not_import_torch(argv, tmp_path):
    code = f"import sys\nfrom rebasin_callbacks import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert "TORCH False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_planted_frame_recovered_with_attention_head_groups():
    """Heads moved as blocks: the frame change composes whole axes (a unit group inside moved heads is not
    composed group by group), so three head-permuted copies of a ViT land exactly on model 0."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    base = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=4,
        mlp_ratio=2.0, global_pool="avg", class_token=False,
    ).eval()  # fmt: skip
    x = torch.randn(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = trace_spec(base, x)
    assert spec.block_groups, "the ViT's spec should move heads as blocks"
    models = [permute(base, spec, random_permutations(spec, seed)) for seed in (1, 2, 3)]
    result = merge(models, spec=spec, method="merge_many", progress=False)
    for i in range(3):
        assert _states_equal(result.models[i], models[0]), i
    assert result.cycle_error() == 0.0
