"""Failure modes of the `rebasin` command and of checkpoint loading: inputs are never overwritten, outputs
are checked before any work and written atomically, a spec that changes the function writes nothing, and
checkpoints that do not fit (ambiguous submodules, integer tensors, extra keys) are refused by name."""

from __future__ import annotations

import errno
import os
import textwrap

import pytest
import torch
from torch import nn

from rebasin_callbacks import cli
from rebasin_callbacks.checkpoints import (
    AmbiguousReferenceError,
    match_reference,
    save_state_dict,
)
from rebasin_callbacks.commands import align as align_command
from rebasin_callbacks.commands import lmc as lmc_command
from rebasin_callbacks.commands.common import EXIT_MISMATCH, EXIT_USAGE
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.trace import trace_spec

MODELS = textwrap.dedent(
    """
    import torch

    def mlp(num_classes=10):
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 24), torch.nn.ReLU(),
            torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Linear(24, num_classes),
        )
    """
)
BASE = ["--arch", "models:mlp", "--input-shape", "64", "--steps", "2", "--no-progress"]


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10)
    )


@pytest.fixture
def rebasin(monkeypatch, capsys):
    """Run `rebasin ARGS...` in-process; returns (exit status, stdout, stderr)."""

    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.fixture
def ckpts(tmp_path, monkeypatch):
    """models.py, a.pt (plain state dict) and b.ckpt (Lightning layout with an epoch and optimizer state)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS)
    torch.manual_seed(0)
    a = _mlp()
    spec = trace_spec(a, torch.randn(2, 64))
    b = permute(a, spec, random_permutations(spec, torch.Generator().manual_seed(1)))
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(
        {
            "epoch": 3,
            "optimizer_states": [{"lr": 0.1}],
            "state_dict": {f"model.{k}": v for k, v in b.state_dict().items()},
        },
        tmp_path / "b.ckpt",
    )
    return tmp_path


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _no_work(monkeypatch):
    """Make any loading fail loudly: the checks under test must come before it."""

    def boom(*_a, **_k):
        raise AssertionError("the command started working before checking its outputs")

    monkeypatch.setattr(align_command, "load_models", boom)
    monkeypatch.setattr(lmc_command, "load_models", boom)


# ------------------------------------------------------------------ a spec that changes the function
def test_align_with_a_wrong_spec_exits_non_zero_and_writes_nothing(rebasin, ckpts):
    a = _mlp()
    a.load_state_dict(torch.load(ckpts / "a.pt", weights_only=True))
    good = trace_spec(a, torch.randn(2, 64))
    axes = {k: tuple(v) for k, v in good.axes_to_perm.items()}
    group = axes["1.weight"][0]
    axes["3.weight"] = (axes["3.weight"][0], None)  # drop the consumer axis: the hidden units get reordered
    assert group is not None
    wrong = PermutationSpec.from_axes(axes, a.state_dict())
    (ckpts / "wrong.json").write_text(wrong.to_json())
    before = _snapshot(ckpts)
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--spec", "wrong.json", "--out", "c.pt",
                             "--json", "c.json", "--perms", "p.pt")  # fmt: skip
    assert code == EXIT_MISMATCH, (out, err)
    assert "nothing was written" in err and "Traceback" not in err
    assert _snapshot(ckpts) == before  # no output, inputs untouched


# ------------------------------------------------------------------ outputs that are inputs
@pytest.mark.parametrize(
    "argv",
    [
        ["align", "a.pt", "b.ckpt", *BASE, "--out", "a.pt"],
        ["align", "a.pt", "b.ckpt", *BASE, "--out", "./sub/../a.pt"],
        ["align", "a.pt", "b.ckpt", *BASE, "--out", "c.pt", "--json", "b.ckpt"],
        ["align", "a.pt", "b.ckpt", *BASE, "--out", "c.pt", "--perms", "link.pt"],  # a symlink to a.pt
        ["align", "a.pt", "b.ckpt", *BASE, "--out", "c.pt", "--json", "models.py"],  # --arch's file
        ["align", "a.pt", "b.ckpt", *BASE, "--out", "c.pt", "--json", "c.pt"],  # two outputs, one file
        ["lmc", "a.pt", "b.ckpt", *BASE, "--data", "digits", "--json", "b.ckpt"],
        ["lmc", "a.pt", "b.ckpt", *BASE, "--data", "digits", "--plot", "a.pt"],
    ],
)
def test_an_output_that_is_an_input_is_refused_before_any_work(rebasin, ckpts, monkeypatch, argv):
    argv = [a.replace("models:mlp", "models.py:mlp") if "models.py" in argv else a for a in argv]
    (ckpts / "sub").mkdir()
    (ckpts / "link.pt").symlink_to(ckpts / "a.pt")
    before = _snapshot(ckpts)
    _no_work(monkeypatch)
    code, out, err = rebasin(*argv)
    assert code == EXIT_USAGE, (out, err)
    assert "Traceback" not in err and ("refusing to overwrite an input" in err or "same file" in err)
    assert _snapshot(ckpts) == before


# ------------------------------------------------------------------ unwritable outputs, up front
@pytest.mark.parametrize(
    ("out", "needle"),
    [("folder", "is a directory"), ("a.pt/c.pt", "not a directory"), ("c.json", "is a directory")],
)
def test_unwritable_output_paths_fail_up_front(rebasin, ckpts, monkeypatch, out, needle):
    (ckpts / "folder").mkdir()
    (ckpts / "c.json").mkdir()
    _no_work(monkeypatch)
    argv = ["align", "a.pt", "b.ckpt", *BASE, "--out", out]
    if out == "c.json":
        argv = [*argv[:-1], "c.pt", "--json", "c.json"]
    code, _, err = rebasin(*argv)
    assert code == EXIT_USAGE
    assert needle in err and "Traceback" not in err


# ------------------------------------------------------------------ atomic writes
def _half_written_save(obj, f, *args, **kwargs):
    """torch.save that writes a few bytes, then fails as a full disk would."""
    handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115
    handle.write(b"PK\x03\x04 half a checkpoint")
    handle.flush()
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_save_keeps_the_previous_output_and_leaves_no_partial_file(rebasin, ckpts, monkeypatch):
    code, _, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--out", "c.pt")
    assert code == 0, err
    previous = (ckpts / "c.pt").read_bytes()
    files = sorted(p.name for p in ckpts.iterdir())
    monkeypatch.setattr(torch, "save", _half_written_save)
    code, _, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--out", "c.pt")
    assert code != 0 and "No space left" in err and "Traceback" not in err
    assert (ckpts / "c.pt").read_bytes() == previous
    assert sorted(p.name for p in ckpts.iterdir()) == files  # no temporary file left behind


def test_save_state_dict_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    save_state_dict(nn.Linear(2, 3), path)
    previous = path.read_bytes()
    monkeypatch.setattr(torch, "save", _half_written_save)
    with pytest.raises(OSError, match="No space"):
        save_state_dict(nn.Linear(2, 3), path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


def test_a_failing_json_write_keeps_the_previous_json(rebasin, ckpts, monkeypatch):
    (ckpts / "c.json").write_text('{"old": true}')
    from rebasin_callbacks import io

    def no_fsync(fd):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(io.os, "fsync", no_fsync)
    code, _, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--out", "c.pt", "--json", "c.json")
    assert code != 0 and "File too large" in err
    assert (ckpts / "c.json").read_text() == '{"old": true}'
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ checkpoints that do not fit
def test_two_candidate_submodules_are_an_error_naming_both_and_the_flag(rebasin, ckpts):
    a = torch.load(ckpts / "a.pt", weights_only=True)
    ema = {k: v + 1 for k, v in a.items()}
    both = {**{f"ema_model.{k}": v for k, v in ema.items()}, **{f"model.{k}": v for k, v in a.items()}}
    torch.save({"state_dict": both}, ckpts / "two.ckpt")
    code, out, err = rebasin("align", "two.ckpt", "b.ckpt", *BASE, "--out", "c.pt")
    assert code == EXIT_MISMATCH, (out, err)
    assert "ema_model.*" in err and "model.*" in err and "--submodule" in err
    assert not (ckpts / "c.pt").exists()
    code, out, err = rebasin(
        "align", "two.ckpt", "b.ckpt", *BASE, "--steps", "0", "--submodule", "ema_model", "--out", "c.pt"
    )
    assert code == 0, err
    with pytest.raises(AmbiguousReferenceError, match="ema_model"):
        match_reference(both, _mlp())
    chosen = match_reference(both, _mlp(), prefix_hint="ema_model")
    assert torch.equal(chosen["1.weight"], ema["1.weight"])


def test_an_integer_state_dict_is_refused_with_the_key(rebasin, ckpts):
    a = torch.load(ckpts / "a.pt", weights_only=True)
    torch.save({k: (v * 100).long() for k, v in a.items()}, ckpts / "int.pt")
    code, out, err = rebasin("align", "int.pt", "b.ckpt", *BASE, "--out", "c.pt")
    assert code == EXIT_MISMATCH, (out, err)
    assert "'1.weight'" in err and "int64" in err
    assert not (ckpts / "c.pt").exists()
    with pytest.raises(SpecMismatchError, match="int64"):
        match_reference({k: (v * 100).long() for k, v in a.items()}, _mlp())


def test_buffers_that_are_integers_in_the_model_still_load():
    bn = nn.BatchNorm1d(4)  # num_batches_tracked is an int64 buffer
    assert set(match_reference(nn.BatchNorm1d(4).state_dict(), bn)) == set(bn.state_dict())


def test_a_checkpoint_with_extra_keys_is_refused_naming_them(rebasin, ckpts):
    deeper = {**torch.load(ckpts / "a.pt", weights_only=True), "7.weight": torch.zeros(10, 10),
              "7.bias": torch.zeros(10)}  # fmt: skip
    torch.save(deeper, ckpts / "deeper.pt")
    code, out, err = rebasin("align", "a.pt", "deeper.pt", *BASE, "--out", "c.pt")
    assert code == EXIT_MISMATCH, (out, err)
    assert "'7.weight'" in err and "deeper.pt" in err
    assert not (ckpts / "c.pt").exists()
    lightning = {"state_dict": {f"model.{k}": v for k, v in deeper.items()} | {"loss.weight": torch.ones(3)}}
    with pytest.raises(SpecMismatchError, match="7.weight"):
        match_reference(lightning["state_dict"], _mlp())


def test_entries_outside_the_chosen_submodule_are_not_extra():
    net = _mlp()
    state = {f"model.{k}": v for k, v in net.state_dict().items()} | {"loss_fn.weight": torch.ones(3)}
    assert set(match_reference(state, _mlp())) == set(net.state_dict())


def test_messages_say_which_side_is_the_file_and_which_the_architecture(rebasin, ckpts):
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 10))  # fmt: skip
    torch.save(wide.state_dict(), ckpts / "wide.pt")
    code, _, err = rebasin("align", "a.pt", "wide.pt", *BASE, "--out", "c.pt")
    assert code == EXIT_MISMATCH
    assert (
        "checkpoint wide.pt (MODEL_B): '1.weight' has shape (32, 64); architecture models:mlp expects (24, 64)"
        in err
    )
