"""The `rebasin align | lmc | spec` subcommands end to end on small checkpoints, and their error exits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from rebasin_callbacks import cli
from rebasin_callbacks.commands.common import EXIT_MISMATCH, EXIT_USAGE, fit_to_shape
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import trace_spec

SUBCOMMANDS = {
    "align": ("rebasin_callbacks.commands.align", "align checkpoint A to checkpoint B"),
    "lmc": ("rebasin_callbacks.commands.lmc", "linear mode connectivity of two checkpoints"),
    "spec": ("rebasin_callbacks.commands.spec", "trace and print an architecture's permutation spec"),
}

MODELS = textwrap.dedent(
    """
    import torch

    def mlp(num_classes=10, in_features=64, width=24):
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(in_features, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, num_classes),
        )
    """
)


@pytest.fixture
def rebasin(monkeypatch, capsys):
    """Run `rebasin ARGS...` in-process; returns (exit status, stdout, stderr)."""
    for name, entry in SUBCOMMANDS.items():
        monkeypatch.setitem(cli.COMMANDS, name, entry)

    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def _mlp(width: int = 24) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """models.py (the architecture), A as a plain state dict, B = a planted permutation of A plus noise in a
    Lightning-style checkpoint (``state_dict`` with a ``model.`` prefix)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    torch.manual_seed(0)
    a = _mlp()
    spec = trace_spec(a, torch.randn(2, 64))
    b = permute(a, spec, random_permutations(spec, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(
        {"epoch": 3, "state_dict": {f"model.{k}": v for k, v in b.state_dict().items()}}, tmp_path / "b.ckpt"
    )
    return tmp_path, a, b


def test_align_keeps_a_s_function_and_lands_next_to_b(rebasin, checkpoints):
    tmp, a, b = checkpoints
    code, out, err = rebasin(
        "align", "a.pt", "b.ckpt", "--arch", "models:mlp", "--input-shape", "64", "--out", "aligned.pt",
        "--json", "summary.json", "--perms", "perms.pt", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "saved: aligned.pt" in out
    aligned = _mlp()
    aligned.load_state_dict(torch.load(tmp / "aligned.pt", weights_only=True))
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), a(x), rtol=1e-5, atol=1e-5)
    before = _distance(a.state_dict(), b.state_dict())
    after = _distance(aligned.state_dict(), b.state_dict())
    assert after < 0.1 * before  # the planted permutation is undone: only the noise remains
    summary = json.loads((tmp / "summary.json").read_text())
    assert summary["l2_after"] == pytest.approx(after, rel=1e-4)
    assert summary["function_rel_error"] < 1e-5
    perms = torch.load(tmp / "perms.pt", weights_only=True)
    assert sorted(perms) == sorted(trace_spec(a, torch.randn(2, 64)).groups)


def test_align_reads_a_real_lightning_checkpoint(rebasin, checkpoints):
    pl = pytest.importorskip("lightning.pytorch")
    tmp, a, _ = checkpoints

    class Wrapped(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters()
            self.model = _mlp()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 64), torch.arange(8)))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp)  # fmt: skip
    trainer.fit(Wrapped(), data)
    trainer.save_checkpoint(tmp / "trained.ckpt")
    code, out, err = rebasin(
        "align", "trained.ckpt", "a.pt", "--arch", "models:mlp", "--input-shape", "64", "--out", "c.pt",
        "--steps", "5", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert set(torch.load(tmp / "c.pt", weights_only=True)) == set(a.state_dict())


def test_lmc_writes_a_png_and_the_three_curves(rebasin, checkpoints):
    tmp, _, _ = checkpoints
    code, out, err = rebasin(
        "lmc", "a.pt", "b.ckpt", "--arch", "models:mlp", "--data", "digits", "--align", "--steps", "5",
        "--n-points", "3", "--plot", "plots/lmc.png", "--json", "lmc.json", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp / "plots" / "lmc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((tmp / "lmc.json").read_text())
    assert list(curves) == ["naive", "re-based (Sinkhorn)", "weight matching"]
    assert all(c["lambdas"] == [0.0, 0.5, 1.0] for c in curves.values())
    assert {"loss", "accuracy"} <= set(curves["naive"]["values"])
    assert "naive" in out and "weight matching" in out


def test_spec_prints_groups_and_writes_json(rebasin, checkpoints):
    tmp, a, _ = checkpoints
    code, out, err = rebasin("spec", "--arch", "models.py:mlp", "--input-shape", "64", "--json", "spec.json")
    assert code == 0, err
    traced = trace_spec(a, torch.randn(2, 64))
    for group in traced.groups:
        assert group in out
    assert f"{len(traced)} groups; {traced.coverage(a.state_dict()):.1%} of the values" in out
    saved = PermutationSpec.from_json(tmp / "spec.json")
    assert saved.axes_to_perm == traced.axes_to_perm


def test_spec_of_a_timm_resnet(rebasin):
    pytest.importorskip("timm")
    code, out, err = rebasin(
        "spec", "--arch", "timm:resnet10t", "--num-classes", "5", "--input-shape", "3", "32", "32"
    )
    assert code == 0, err
    assert "layer1.0.conv1" in out and "groups;" in out


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (
            ["align", "missing.pt", "b.ckpt", "--arch", "models:mlp", "--out", "x.pt"],
            EXIT_USAGE,
            "missing.pt",
        ),
        (["lmc", "a.pt", "gone.ckpt", "--arch", "models:mlp"], EXIT_USAGE, "gone.ckpt"),
        (["align", "a.pt", "wide.pt", "--arch", "models:mlp", "--out", "x.pt"], EXIT_MISMATCH, "(32, 64)"),
        (
            ["align", "a.pt", "b.ckpt", "--arch", "torchvision:resnet18", "--out", "x.pt"],
            EXIT_MISMATCH,
            "conv1.weight",
        ),
        (["align", "a.pt", "b.ckpt", "--arch", "models:nothing", "--out", "x.pt"], EXIT_USAGE, "'nothing'"),
        (
            ["align", "a.pt", "b.ckpt", "--arch", "nosuchmodule:f", "--out", "x.pt"],
            EXIT_USAGE,
            "nosuchmodule",
        ),
        (["align", "a.pt", "b.ckpt", "--arch", "mlp", "--out", "x.pt"], EXIT_USAGE, "timm:NAME"),
        (
            ["align", "a.pt", "b.ckpt", "--arch", "models:mlp", "--input-shape", "3", "9", "--out", "x.pt"],
            EXIT_USAGE,
            "--input-shape",
        ),  # fmt: skip
        (
            ["align", "a.pt", "b.ckpt", "--arch", "models:mlp", "--cost", "mid", "--out", "x.pt"],
            EXIT_USAGE,
            "--data",
        ),
        (["align", "a.pt", "notes.txt", "--arch", "models:mlp", "--out", "x.pt"], EXIT_USAGE, "weights_only"),
    ],
)
def test_user_errors_exit_with_a_message_and_no_traceback(rebasin, checkpoints, argv, code, needle):
    tmp, _, _ = checkpoints
    torch.save(_mlp(width=32).state_dict(), tmp / "wide.pt")
    (tmp / "notes.txt").write_text("not a checkpoint")
    got, out, err = rebasin(*argv)
    assert got == code, (out, err)
    assert needle in err
    assert "Traceback" not in err and err.startswith(f"rebasin {argv[0]}: error:")
    assert not (tmp / "x.pt").exists()


def test_fit_to_shape_resizes_and_repeats_channels():
    x = torch.rand(2, 1, 8, 8)
    y = fit_to_shape(x, (3, 16, 16))
    assert y.shape == (2, 3, 16, 16)
    assert torch.equal(y[:, 0], y[:, 2])
    assert torch.equal(fit_to_shape(x, (64,)), x.reshape(2, 64))


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_help_explains_every_option(rebasin, name):
    with pytest.raises(SystemExit) as exit_info:
        rebasin(name, "--help")
    assert exit_info.value.code == 0
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    undocumented = [a.dest for a in sub._actions if a.dest != "help" and not a.help]
    assert not undocumented


# ----------------------------------------------------------------------------- head size / stem inferred
def _torchvision_pair(tmp, num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = torchvision.models.resnet18(num_classes=num_classes)
        m.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)  # a grey-scale stem, as users build it
        models.append(m.eval())
    torch.save(models[0].state_dict(), tmp / "a.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in models[1].state_dict().items()}}, tmp / "b.ckpt")
    return models[0]


def test_align_torchvision_needs_no_flag_for_head_size_and_stem(rebasin, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _torchvision_pair(tmp_path)
    code, out, err = rebasin(
        "align", "a.pt", "b.ckpt", "--arch", "torchvision:resnet18", "--out", "c.pt", "--steps", "0", "--no-progress"
    )  # fmt: skip
    assert code == 0, err
    assert "num_classes=10 (from 'fc.weight' (10, 512))" in out
    assert "in_chans=1 (from 'conv1.weight' (64, 1, 7, 7))" in out
    assert "refinement: weight matching only (--steps 0)" in out
    for phase in (
        "loading",
        "input [1, 224, 224] (the default of torchvision:resnet18",
        "tracing the permutation spec",
        "aligning",
    ):
        assert phase in out
    aligned = copy.deepcopy(a)
    aligned.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), a(x), rtol=1e-4, atol=1e-4)
    assert not torch.equal(aligned.conv1.weight, a.conv1.weight)  # it was permuted


def test_flags_override_what_the_checkpoint_says_and_errors_name_file_and_architecture(
    rebasin, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _torchvision_pair(tmp_path)
    code, out, err = rebasin(
        "align", "a.pt", "b.ckpt", "--arch", "torchvision:resnet18", "--num-classes", "100", "--out", "c.pt"
    )  # fmt: skip
    assert code == EXIT_MISMATCH, (out, err)
    assert (
        "checkpoint a.pt (MODEL_A): 'fc.weight' has shape (10, 512); "
        "architecture torchvision:resnet18 (num_classes=100, in_chans=1) expects (100, 512)"
    ) in err
    assert not (tmp_path / "c.pt").exists()


def test_timm_head_size_and_stem_are_inferred(rebasin, tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        torch.manual_seed(seed)
        torch.save(timm.create_model("resnet10t", num_classes=5, in_chans=2).state_dict(), tmp_path / name)
    code, out, err = rebasin("align", "a.pt", "b.pt", "--arch", "timm:resnet10t", "--input-shape", "2", "32", "32",
                             "--out", "c.pt", "--steps", "0", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "num_classes=5" in out and "in_chans=2" in out


def test_steps_zero_is_documented_as_weight_matching_only():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["align"]
    steps = next(a for a in sub._actions if a.dest == "steps")
    assert "0 = weight matching only" in steps.help


# ----------------------------------------------------------------------------- fast start
def _run_without_root(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with the package's own modules but a stub package root, so what ``cli`` and the
    subcommands import is measured apart from the root's exports."""
    folder = Path(cli.__file__).parent
    prelude = textwrap.dedent(
        f"""
        import sys, types
        pkg = types.ModuleType("rebasin_callbacks"); pkg.__path__ = [{str(folder)!r}]
        sys.modules["rebasin_callbacks"] = pkg
        """
    )
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("argv", [["--help"], ["align", "--help"], ["lmc", "--help"], ["spec", "--help"],
                                  ["demo", "--help"], ["align", "a.pt"], ["nosuchcommand"]])  # fmt: skip
def test_help_and_usage_errors_do_not_import_torch(argv):
    result = _run_without_root(
        f"""
        from rebasin_callbacks import cli
        try:
            cli.main({argv!r})
        except SystemExit:
            pass
        print("TORCH", "torch" in sys.modules)
        """
    )
    assert "TORCH False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["align", "missing.pt", "b.pt", "--arch", "timm:resnet18", "--out", "c.pt"],
            "MODEL_A: no such file",
        ),
        (["lmc", "a.pt", "missing.pt", "--arch", "timm:resnet18"], "MODEL_B: no such file"),
        (["align", "a.pt", "b.pt", "--arch", "resnet18", "--out", "c.pt"], "--arch 'resnet18': expected"),
        (["lmc", "a.pt", "b.pt", "--arch", "timm:"], "--arch 'timm:': expected"),
        (["spec", "--arch", ":mlp"], "--arch ':mlp': expected"),
        (
            ["align", "a.pt", "b.pt", "--arch", "m:f", "--spec", "nope.json", "--out", "c.pt"],
            "--spec: no such file",
        ),
        (
            ["align", "a.pt", "b.pt", "--arch", "m:f", "--steps", "-1", "--out", "c.pt"],
            "--steps must be >= 0",
        ),
        (["lmc", "a.pt", "b.pt", "--arch", "m:f", "--n-points", "1"], "--n-points must be >= 2"),
        (
            ["lmc", "a.pt", "b.pt", "--arch", "m:f", "--input-shape", "3", "0", "2"],
            "--input-shape must be positive",
        ),
        (
            ["align", "a.pt", "b.pt", "--arch", "m:f", "--cost", "mid", "--out", "c.pt"],
            "--cost mid needs data",
        ),
        (["align", "a.pt", "b.pt", "--arch", "m:f", "--out", "a.pt"], "refusing to overwrite an input"),
    ],
)
def test_mistakes_are_reported_before_torch_is_imported(tmp_path, argv, needle):
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    result = _run_without_root(
        f"""
        import os
        os.chdir({str(tmp_path)!r})
        from rebasin_callbacks import cli
        code = cli.main({argv!r})
        print("EXIT", code, "TORCH", "torch" in sys.modules)
        """
    )
    assert "EXIT 2 TORCH False" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_rebasin_entry_point_starts_without_torch():
    probe = subprocess.run([sys.executable, "-c", "import sys, rebasin_callbacks; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert probe.stdout.strip() == "False", "the package root imports torch eagerly: " + probe.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom rebasin_callbacks import cli\ntry:\n cli.main(['--help'])\n"
         "except SystemExit:\n pass\nprint('TORCH', 'torch' in sys.modules)"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "TORCH False" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_align_on_cuda_keeps_the_function_within_the_tf32_tolerance(rebasin, checkpoints):
    tmp, a, _ = checkpoints
    code, out, err = rebasin(
        "align", "a.pt", "b.ckpt", "--arch", "models:mlp", "--input-shape", "64", "--device", "cuda",
        "--out", "aligned.pt", "--steps", "5", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "on cuda" in out
    aligned = _mlp()
    aligned.load_state_dict(torch.load(tmp / "aligned.pt", weights_only=True))  # saved on the CPU
    x = torch.randn(16, 64)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), a(x), rtol=1e-4, atol=1e-4)


def test_the_reason_the_refinement_stopped_is_told():
    from types import SimpleNamespace

    from rebasin_callbacks.commands.align import stop_reason

    flat = SimpleNamespace(steps=31, history={"init_cost": [5.0], "best_cost": [4.0] * 31})
    assert stop_reason(flat, 200) == (
        "stopped after 31 of 200 steps: no better permutation in the last 30 steps (early stopping: out of "
        "patience, or searching on would take longer than the weight-matching warm start did)"
    )
    assert stop_reason(SimpleNamespace(steps=5, history={}), 5) == "ran all 5 steps (--steps)"
    assert (
        stop_reason(SimpleNamespace(steps=0, history={}, stop_reason="its own words"), 5) == "its own words"
    )


def test_root_exports_are_the_functions_not_the_submodules_of_the_same_name():
    # `align`, `permute` and `sinkhorn` are both modules and functions: importing the submodule must not
    # replace the exported function on the lazily-filled package.
    code = (
        "import rebasin_callbacks.align, rebasin_callbacks.permute, rebasin_callbacks.sinkhorn\n"
        "import rebasin_callbacks as r\n"
        "from rebasin_callbacks import align, permute, sinkhorn\n"
        "print(all(callable(f) and not hasattr(f, '__path__') and type(f).__name__ == 'function'"
        " for f in (align, permute, sinkhorn, r.align)), sorted(r.__all__) == sorted(r._EXPORTS))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "True"], result.stdout + result.stderr[-2000:]


def test_lmc_prints_the_endpoints_and_warns_when_one_is_at_chance():
    from rebasin_callbacks.commands.lmc import describe_endpoints
    from rebasin_callbacks.lmc import LMCResult

    good = LMCResult.from_values([0, 0.5, 1], {"loss": [0.2, 1.0, 0.3], "accuracy": [0.95, 0.6, 0.9]})
    text = describe_endpoints(good, "a.pt", "b.pt", n_classes=10)
    assert "A (a.pt) loss 0.2000 accuracy 0.9500" in text and "B (b.pt) loss 0.3000" in text
    assert "warning" not in text
    bad = LMCResult.from_values([0, 0.5, 1], {"loss": [0.2, 1.0, 2.3], "accuracy": [0.95, 0.6, 0.11]})
    assert "warning: B (b.pt) has accuracy 0.1100" in describe_endpoints(bad, "a.pt", "b.pt", n_classes=10)


# ----------------------------------------------------------------------------- labels that match what ran
def test_a_wrong_channel_count_is_told_the_right_shape(rebasin, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _torchvision_pair(tmp_path, in_chans=3)
    code, out, err = rebasin("align", "a.pt", "b.ckpt", "--arch", "torchvision:resnet18", "--input-shape", "1",
                             "32", "32", "--steps", "0", "--out", "c.pt")  # fmt: skip
    assert code == EXIT_USAGE and "use --input-shape 3 32 32" in err, err
    # the stem's channels are printed even when they are the architecture's default
    assert "in_chans=3 (from 'conv1.weight' (64, 3, 7, 7))" in out


def test_lmc_chooses_the_data_s_size_says_so_and_steps_zero_shows_only_what_ran(
    rebasin, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _torchvision_pair(tmp_path)
    code, out, err = rebasin("lmc", "a.pt", "b.ckpt", "--arch", "torchvision:resnet18", "--data", "digits",
                             "--align", "--steps", "0", "--n-points", "2", "--max-batches", "1",
                             "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "evaluating at input [1, 8, 8] (the digits' own size, 1 channel from the stem" in out
    assert "weight matching only, --steps 0" in out and "Sinkhorn" not in out
    assert "re-based" not in out and "weight matching" in out


def test_spec_help_does_not_mention_checkpoints():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["spec"]
    text = sub.format_help()
    assert "MODEL_A" not in text and "the architecture's own" in text


def test_plots_follow_the_conventions_a_paper_figure_would():
    pytest.importorskip("matplotlib")
    from rebasin_callbacks.lmc import LMCResult
    from rebasin_callbacks.plotting import plot_lmc

    values = {"loss": [0.1, 0.9, 0.1], "accuracy": [0.9, 0.5, 0.9]}
    naive = LMCResult.from_values([0, 0.5, 1], values, label="naive")
    fig = plot_lmc([naive], split="MNIST test")
    assert fig._suptitle is not None and "model A -> model B" in fig._suptitle.get_text()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # lay out, so the legend's place is known
    for ax, quantity in zip(fig.axes, ("loss (cross-entropy)", "accuracy")):
        assert ax.get_ylabel() == f"MNIST test {quantity}"
        assert "0 = model A, 1 = model B" in ax.get_xlabel()
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == [
            f"naive (barrier {naive.barriers[quantity.split()[0]]:.3g})"
        ]
        assert (
            legend.get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0
        )  # below, off the curves
