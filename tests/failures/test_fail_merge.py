"""Failure modes of merge() and `rebasin merge`: bad inputs (one model, different architectures, a spec that
does not fit, NaN weights, bad weights or options) are refused with a message naming the model, key and
shapes, before any work, and nothing is written or modified."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from rebasin_callbacks import PermutationSpec, SpecMismatchError, cli, merge, trace_spec
from rebasin_callbacks.commands.common import EXIT_MISMATCH, EXIT_USAGE


def _mlp(width: int = 12) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


def _snapshot(models):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def _unchanged(models, snaps) -> bool:
    return all(all(torch.equal(s[k], v) for k, v in m.state_dict().items()) for m, s in zip(models, snaps))


def test_one_model_is_refused():
    with pytest.raises(ValueError, match="at least 2 models, got 1"):
        merge([_mlp()], example_inputs=torch.randn(2, 4), progress=False)
    with pytest.raises(TypeError, match="list of nn.Module"):
        merge(_mlp(), example_inputs=torch.randn(2, 4), progress=False)  # type: ignore[arg-type]


def test_different_architectures_are_named_with_key_and_shapes():
    models = [_mlp(), _mlp(), _mlp(width=16)]
    snaps = _snapshot(models)
    with pytest.raises(
        SpecMismatchError, match=r"'0.weight' axis 0 has size 12 in models\[0\] but 16 in models\[2\]"
    ):
        merge(models, example_inputs=torch.randn(2, 4), progress=False)
    with pytest.raises(SpecMismatchError, match="Sequential but models.1. is a Linear"):
        merge([_mlp(), nn.Linear(4, 3)], example_inputs=torch.randn(2, 4), progress=False)
    assert _unchanged(models, snaps)


def test_a_spec_that_does_not_fit_is_refused():
    other = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    wrong = trace_spec(other, torch.randn(2, 4))  # another architecture's spec
    models = [_mlp(), _mlp(), _mlp()]
    with pytest.raises(SpecMismatchError, match="2.weight. has size 3"):
        merge(models, spec=wrong, progress=False)
    bad_size = PermutationSpec.from_axes({"0.weight": ("P", None), "0.bias": ("P",)}, sizes={"P": 7})
    with pytest.raises(SpecMismatchError):
        merge(models, spec=bad_size, progress=False)


def test_nan_weights_are_named_before_any_work():
    models = [_mlp(), _mlp(), _mlp()]
    with torch.no_grad():
        models[1][2].bias[0] = float("nan")
    snaps = _snapshot(models)
    with pytest.raises(ValueError, match=r"models\[1\]: '2.bias' holds 1 NaN/inf"):
        merge(models, example_inputs=torch.randn(2, 4), progress=False)
    assert all(torch.equal(s[k], v) or torch.isnan(v).any() for m, s in zip(models, snaps)
               for k, v in m.state_dict().items())  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"weights": [1.0, 2.0]}, "weights has 2 entries for 3 models"),
        ({"weights": [1.0, -1.0, 1.0]}, "weights must be finite"),
        ({"weights": [0.0, 0.0, 0.0]}, "weights must be finite"),
        ({"method": "wm"}, "method must be one of"),
        ({"method": "data"}, "needs data"),
        ({"reset_bn": True}, "needs bn_data"),
        ({"steps": -1}, "steps must be"),
    ],
)
def test_bad_options_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        merge([_mlp(), _mlp(), _mlp()], example_inputs=torch.randn(2, 4), progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------ CLI
MODELS = textwrap.dedent(
    """
    import torch

    def mlp(num_classes=3, width=12):
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, num_classes))

    def wide(num_classes=3):
        return mlp(num_classes, 16)
    """
)


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "merge_fail_models.py").write_text(MODELS)
    for i in range(3):
        torch.save(_mlp().state_dict(), tmp_path / f"m{i}.pt")
    torch.save(_mlp(width=16).state_dict(), tmp_path / "wide.pt")
    nan = _mlp()
    with torch.no_grad():
        nan[0].weight[0, 0] = float("nan")
    torch.save(nan.state_dict(), tmp_path / "nan.pt")
    return tmp_path


BASE = ["--arch", "merge_fail_models:mlp", "--input-shape", "4", "--no-progress"]


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["m0.pt", "--out", "x.pt"], EXIT_USAGE, "at least 2 checkpoints, got 1"),
        (["m0.pt", "missing.pt", "--out", "x.pt"], EXIT_USAGE, "MODEL 2: no such file"),
        (["m0.pt", "m1.pt", "--out", "m1.pt"], EXIT_USAGE, "refusing to overwrite an input"),
        (["m0.pt", "m1.pt", "--method", "data", "--out", "x.pt"], EXIT_USAGE, "--data"),
        (["m0.pt", "m1.pt", "--repair", "--out", "x.pt"], EXIT_USAGE, "--repair needs batches"),
        (["m0.pt", "m1.pt", "--weights", "1", "--out", "x.pt"], EXIT_USAGE, "--weights: 1 values for 2"),
        (["m0.pt", "m1.pt", "m2.pt", "wide.pt", "--out", "x.pt"], EXIT_MISMATCH, "wide.pt"),
        (["m0.pt", "nan.pt", "--out", "x.pt"], EXIT_MISMATCH, "NaN"),
        (["m0.pt", "m1.pt", "--aligned-dir", "nowhere", "--out", "x.pt"], EXIT_USAGE, "no such folder"),
    ],
)
def test_cli_errors_exit_with_a_message_and_write_nothing(files, capsys, argv, code, needle):
    stamps = {p.name: p.stat().st_mtime_ns for p in files.glob("*.pt")}
    got = cli.main(["merge", *argv, *BASE])
    out, err = capsys.readouterr()
    assert got == code, (out, err)
    assert needle in err and "Traceback" not in err and err.startswith("rebasin merge: error:")
    assert not (files / "x.pt").exists()
    assert {p.name: p.stat().st_mtime_ns for p in files.glob("*.pt")} == stamps


def test_cli_refuses_a_spec_that_changes_the_function_and_writes_nothing(files, capsys):
    # the hidden units of the first layer permuted without the second layer's inputs: a wrong spec
    spec = PermutationSpec.from_axes({"0.weight": ("P", None), "0.bias": ("P",)}, _mlp().state_dict())
    spec.to_json(files / "wrong.json")
    got = cli.main(["merge", "m0.pt", "m1.pt", "--spec", "wrong.json", "--out", "x.pt", *BASE])
    _, err = capsys.readouterr()
    assert got == EXIT_MISMATCH and "nothing was written" in err
    assert not (files / "x.pt").exists()
