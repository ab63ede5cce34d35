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
        "align", "two.ckpt", "b.ckpt", *BASE, "--steps", "0", "--submodule", "ema_model", "--submodule-b", "model",
        "--out", "c.pt",
    )  # fmt: skip
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


# ------------------------------------------------------------------ dtype kept, non-finite refused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_align_keeps_the_checkpoints_dtype(rebasin, ckpts, dtype):
    a = torch.load(ckpts / "a.pt", weights_only=True)
    b = torch.load(ckpts / "b.ckpt", weights_only=True)["state_dict"]
    torch.save({k: v.to(dtype) for k, v in a.items()}, ckpts / "a_x.pt")
    torch.save({k: v.to(dtype) for k, v in b.items()}, ckpts / "b_x.pt")
    code, out, err = rebasin("align", "a_x.pt", "b_x.pt", *BASE, "--out", "c.pt", "--json", "c.json")
    assert code == 0, err
    c = torch.load(ckpts / "c.pt", weights_only=True)
    assert {v.dtype for v in c.values()} == {dtype}
    # the aligned model holds A's values, only moved: each row of the first layer is one of A's rows, exactly
    rows = {tuple(r.tolist()) for r in a["1.weight"].to(dtype).float()}
    assert {tuple(r.tolist()) for r in c["1.weight"].float()} == rows


def test_lmc_runs_a_float64_pair_in_float64(rebasin, ckpts):
    a = torch.load(ckpts / "a.pt", weights_only=True)
    torch.save({k: v.double() for k, v in a.items()}, ckpts / "a64.pt")
    code, out, err = rebasin("lmc", "a64.pt", "b.ckpt", *BASE, "--data", "digits", "--n-points", "3",
                             "--max-batches", "1", "--json", "l.json")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("command", ["align", "lmc"])
@pytest.mark.parametrize("side", ["a", "b"])
def test_non_finite_checkpoints_are_refused_naming_the_key(rebasin, ckpts, bad, command, side):
    if side == "a":
        state = torch.load(ckpts / "a.pt", weights_only=True)
        state["3.weight"][2, 5] = bad
        torch.save(state, ckpts / "a.pt")
    else:
        ckpt = torch.load(ckpts / "b.ckpt", weights_only=True)
        ckpt["state_dict"]["model.3.weight"][2, 5] = bad
        torch.save(ckpt, ckpts / "b.ckpt")
    before = _snapshot(ckpts)
    extra = ["--out", "c.pt"] if command == "align" else ["--data", "digits", "--json", "l.json"]
    code, out, err = rebasin(command, "a.pt", "b.ckpt", *BASE, *extra)
    assert code == EXIT_USAGE, (out, err)
    assert "3.weight" in err and "non-finite" in err and "Traceback" not in err
    assert ("MODEL_A" if side == "a" else "MODEL_B") in err
    assert _snapshot(ckpts) == before


def test_json_outputs_are_strict_json(tmp_path):
    import json

    from rebasin_callbacks.io import atomic_write_json

    path = atomic_write_json(tmp_path / "r.json", {"barrier": float("nan"), "values": [1.0, float("-inf")]})

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"barrier": None, "values": [1.0, None]}


def test_lmc_json_is_strict_json(rebasin, ckpts):
    import json

    code, out, err = rebasin("lmc", "a.pt", "b.ckpt", *BASE, "--data", "digits", "--n-points", "3",
                             "--max-batches", "1", "--json", "l.json")  # fmt: skip
    assert code == 0, err

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads((ckpts / "l.json").read_text(), parse_constant=refuse)


# ------------------------------------------------------------------ --submodule that is not there
@pytest.mark.parametrize("command", ["align", "lmc"])
def test_a_submodule_absent_from_the_checkpoint_is_refused_naming_what_is_there(rebasin, ckpts, command):
    extra = ["--out", "c.pt"] if command == "align" else ["--data", "digits"]
    code, out, err = rebasin(command, "b.ckpt", "b.ckpt", *BASE, "--submodule", "ema_model", *extra)
    assert code == EXIT_USAGE, (out, err)
    assert "--submodule ema_model" in err and "model.* (6 entries)" in err and "Traceback" not in err
    assert not (ckpts / "c.pt").exists()
    # a plain state dict has no such prefix either
    code, out, err = rebasin(command, "a.pt", "b.ckpt", *BASE, "--submodule", "model", *extra)
    assert code == EXIT_USAGE and "MODEL_A a.pt" in err and "6 entries without a prefix" in err, err


def test_submodule_b_chooses_model_b_s_own(rebasin, ckpts):
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--submodule", "model", "--out", "c.pt")
    assert code == EXIT_USAGE  # a.pt has no model.*
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--submodule-b", "model", "--out", "c.pt")
    assert code == 0, err


# ------------------------------------------------------------------ malformed or size-less --spec
@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"axes_to_perm": {"1.weight": ["P", 3]}}', "axes_to_perm['1.weight'][1] is 3"),
        ('[["1.weight", "P"]]', "got a list"),
        ('{"axes_to_perm": {"1.weight": "P"}}', "axes_to_perm['1.weight'] is 'P'"),
        ('{"axes_to_perm": {}}', "non-empty"),
        ('{"sizes": {"P": 24}}', '"axes_to_perm" must be'),
        ('{"axes_to_perm": {"1.weight": ["P", null]}, "sizes": {"P": "24"}}', "sizes['P'] is \"24\""),
        ('{"axes_to_perm": {"1.weight": ["P", null]}, "sizes": [24]}', '"sizes" must be an object'),
        ('{"axes_to_perm": {"1.weight": [["P", 0]]}}', "list of blocks"),
        ("{not json", "not JSON"),
        ("", "not JSON"),
    ],
)
def test_a_malformed_spec_is_one_line_and_exit_2(rebasin, ckpts, text, needle):
    (ckpts / "s.json").write_text(text)
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--spec", "s.json", "--out", "c.pt")
    assert code == EXIT_USAGE, (out, err)
    assert needle in err and "--spec s.json" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (ckpts / "c.pt").exists()


def test_a_spec_without_sizes_is_valid(rebasin, ckpts):
    import json

    a = _mlp()
    spec = json.loads(trace_spec(a, torch.randn(2, 64)).to_json())
    del spec["sizes"]
    (ckpts / "s.json").write_text(json.dumps(spec))
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--spec", "s.json", "--out", "c.pt")
    assert code == 0, err


def test_a_spec_naming_a_missing_key_is_a_mismatch(rebasin, ckpts):
    (ckpts / "s.json").write_text('{"axes_to_perm": {"9.weight": ["P", null]}}')
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--spec", "s.json", "--out", "c.pt")
    assert code == EXIT_MISMATCH and "9.weight" in err and "Traceback" not in err, err


def test_a_spec_that_permutes_nothing_is_a_mismatch_in_one_line(rebasin, ckpts):
    (ckpts / "s.json").write_text('{"axes_to_perm": {"1.weight": [null, null]}}')
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, "--spec", "s.json", "--out", "c.pt")
    assert code == EXIT_MISMATCH and "no permutation groups" in err, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (ckpts / "c.pt").exists()


# ------------------------------------------------------------------ every input file
def test_a_whole_pickled_model_gets_one_plain_line_saying_what_to_save(rebasin, ckpts):
    torch.save(_mlp(), ckpts / "whole.pt")
    code, out, err = rebasin("align", "whole.pt", "b.ckpt", *BASE, "--out", "c.pt")
    assert code == EXIT_USAGE, (out, err)
    assert "\x1b" not in err and "weights_only=False" not in err and "add_safe_globals" not in err
    assert "whole pickled model" in err and "torch.save(model.state_dict()" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: p.write_text("not a checkpoint"), "not a readable torch checkpoint"),
        (lambda p: torch.save({"w": 1.5}, p), "not a tensor"),
        (lambda p: torch.save([torch.ones(2)], p), "not a state dict"),
    ],
)
def test_every_unreadable_input_is_named(rebasin, ckpts, make, needle):
    make(ckpts / "x.pt")
    for argv in (
        ["align", "x.pt", "b.ckpt", *BASE, "--out", "c.pt"],
        ["align", "a.pt", "x.pt", *BASE, "--out", "c.pt"],
    ):
        code, out, err = rebasin(*argv)
        assert code == EXIT_USAGE, (argv, out, err)
        assert "x.pt" in err and needle in err and "Traceback" not in err and "\x1b" not in err, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--spec", "nope.json"], "--spec: no such file: nope.json"),
        (["--spec", "."], "--spec: . is not a file"),
        (["--data", "digits", "--data-root", "nowhere"], "--data-root: no such folder: nowhere"),
    ],
)
def test_other_missing_inputs_are_named_before_any_work(rebasin, ckpts, monkeypatch, argv, needle):
    _no_work(monkeypatch)
    code, out, err = rebasin("align", "a.pt", "b.ckpt", *BASE, *argv, "--out", "c.pt")
    assert code == EXIT_USAGE and needle in err, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--out", "a.pt"], "--out a.pt: is a file"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--device", "nosuch"], "--device 'nosuch'"),
    ],
)
def test_demo_checks_its_options_and_output_folder_before_training(rebasin, ckpts, monkeypatch, argv, needle):
    from rebasin_callbacks import demo

    def boom(*_a, **_k):
        raise AssertionError("the demo started training before checking its options")

    monkeypatch.setattr(demo, "run_demo", boom)
    code, out, err = rebasin("demo", "--smoke", *argv)
    assert code == EXIT_USAGE and needle in err and "Traceback" not in err, err


def test_a_curve_that_overflows_is_reported_not_turned_into_a_barrier(rebasin, ckpts):
    """Finite float16 weights whose interpolation overflows: the table says so, the JSON holds null."""
    import json

    a = torch.load(ckpts / "a.pt", weights_only=True)
    b = torch.load(ckpts / "b.ckpt", weights_only=True)["state_dict"]
    big = {k: (v * 3e3).half() if k.endswith("weight") else v.half() for k, v in a.items()}
    torch.save(big, ckpts / "a16.pt")
    torch.save({k: v.half() for k, v in b.items()}, ckpts / "b16.pt")
    code, out, err = rebasin("lmc", "a16.pt", "b16.pt", *BASE, "--data", "digits", "--n-points", "3",
                             "--max-batches", "1", "--json", "l.json")  # fmt: skip
    assert code == 0, err
    assert "NaN or infinite at lambda" in out, out
    data = json.loads((ckpts / "l.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert data["naive"]["barrier"] is None
