"""The `rebasin align | lmc | spec` subcommands end to end on small checkpoints, and their error exits."""

from __future__ import annotations

import json
import textwrap

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
