"""The bottom layer: batch/device helpers, train/eval modes, state-dict checks, thread cap."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from rebasin_callbacks.spec import SpecMismatchError
from rebasin_callbacks.utils import (
    check_compatible,
    check_finite,
    eval_mode,
    interpolate_state_dict,
    l2_distance,
    module_device,
    module_dtype,
    resolve_device,
    split_batch,
    take_batches,
    thread_limit,
    to_device,
    train_mode,
)

Pair = collections.namedtuple("Pair", ["x", "y"])


def test_to_device_nested_containers_and_dtype():
    batch = {"a": (torch.ones(2), [torch.zeros(1, dtype=torch.int64)]), "p": Pair(torch.ones(1), 3), "s": "k"}
    out = to_device(batch, torch.device("cpu"), dtype=torch.float64)
    assert out["a"][0].dtype == torch.float64
    assert out["a"][1][0].dtype == torch.int64  # integer targets keep their dtype
    assert isinstance(out["p"], Pair) and out["p"].y == 3 and out["p"].x.dtype == torch.float64
    assert out["s"] == "k"
    assert batch["a"][0].dtype == torch.float32  # the input is not modified


def test_split_batch_formats():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert split_batch(x)[0] is x and split_batch(x)[1] is None
    assert split_batch((x, y, "meta"))[1] is y
    assert split_batch({"image": x, "label": y}) == (x, y)
    assert split_batch({"x": x})[1] is None
    with pytest.raises(TypeError, match="input key"):
        split_batch({"pixels": x})
    with pytest.raises(TypeError, match="int"):
        split_batch(3)


def test_take_batches_counts_and_errors():
    data = (torch.full((2,), float(i)) for i in range(5))
    got = take_batches(data, 2, "cpu")
    assert [float(b[0]) for b in got] == [0.0, 1.0]
    assert len(take_batches(torch.ones(3), None, "cpu")) == 1
    with pytest.raises(ValueError, match="lmc: the data yielded no batches"):
        take_batches([], None, "cpu", "lmc")
    with pytest.raises(ValueError, match=">= 1"):
        take_batches([torch.ones(1)], 0, "cpu")


def test_module_device_and_dtype():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU()) == torch.device("cpu")
    assert module_dtype(nn.Linear(2, 2).double()) == torch.float64
    assert module_dtype(nn.ReLU()) == torch.get_default_dtype()
    bn_only = nn.BatchNorm1d(3, affine=False).half()
    assert module_dtype(bn_only) == torch.float16  # from a buffer when there is no parameter


@pytest.mark.parametrize("ctx, inside", [(eval_mode, False), (train_mode, True)])
def test_mode_restored_per_submodule_even_on_exception(ctx, inside):
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    net[1].eval()
    net[2].train(not inside)
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with ctx(net):
            assert all(m.training is inside for m in net.modules())
            raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before


def test_check_compatible_names_key_axis_shapes():
    check_compatible(nn.Linear(2, 3), nn.Linear(2, 3).double())  # dtypes may differ
    with pytest.raises(
        SpecMismatchError, match=r"'weight' axis 1 has size 2 in A but 5 in B \(shapes \(3, 2\) vs \(3, 5\)\)"
    ):
        check_compatible(nn.Linear(2, 3), nn.Linear(5, 3), names=("A", "B"))
    with pytest.raises(SpecMismatchError, match="'bias'.*the reference does not"):
        check_compatible(nn.Linear(2, 3), nn.Linear(2, 3, bias=False))
    with pytest.raises(SpecMismatchError, match="'bias'.*the model does not"):
        check_compatible(nn.Linear(2, 3, bias=False), nn.Linear(2, 3))
    with pytest.raises(SpecMismatchError, match="2 axes in the model but 1"):
        check_compatible({"w": torch.ones(2, 2)}, {"w": torch.ones(4)})
    assert issubclass(SpecMismatchError, ValueError)


def test_check_finite_names_entry():
    check_finite(nn.Linear(2, 2))
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.bias[0] = float("inf")
    with pytest.raises(ValueError, match="reference: 'bias' holds 1 NaN/inf"):
        check_finite(net, "reference")


def test_l2_distance_parameters_vs_state_dict():
    a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        b.weight.add_(1.0)
        b.running_mean.add_(2.0)
    assert l2_distance(a, b) == pytest.approx(3**0.5)  # modules: parameters only
    full = l2_distance(a.state_dict(), b.state_dict())  # state dicts: every float entry (num_batches skipped)
    assert full == pytest.approx((3 * 1 + 3 * 4) ** 0.5)
    mixed = l2_distance(
        {"w": torch.zeros(2, dtype=torch.float16)}, {"w": torch.full((2,), 1.0, dtype=torch.float64)}
    )
    assert mixed == pytest.approx(2**0.5)
    with pytest.raises(TypeError):
        l2_distance(a, b.state_dict())


def test_interpolate_state_follows_a_and_keeps_integers():
    a = {"w": torch.zeros(2), "n": torch.tensor(1)}
    b = {"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor(7)}
    mid = interpolate_state_dict(a, b, 0.25)
    assert mid["w"].dtype == torch.float32 and mid["w"].tolist() == [0.25, 0.25]
    assert int(mid["n"]) == 1
    assert torch.equal(interpolate_state_dict(a, b, 1.0)["w"], b["w"].float())
    assert a["w"].sum() == 0  # not modified
    with pytest.raises(SpecMismatchError, match="model_b"):
        interpolate_state_dict(a, {"w": torch.ones(2)}, 0.5)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_interpolation_is_exact_at_the_endpoints_whatever_the_other_end_holds(bad):
    """0 * inf is NaN: the formula alone would not give the endpoints where the other end is not finite."""
    a = {"w": torch.tensor([bad, 1.0, -0.0]), "h": torch.tensor([1.5, bad], dtype=torch.float16)}
    b = {"w": torch.tensor([2.0, bad, 3.0]), "h": torch.tensor([bad, -2.0], dtype=torch.float16)}
    at_b = interpolate_state_dict(a, b, 1.0)
    at_a = interpolate_state_dict(a, b, 0)
    for key in a:
        assert torch.equal(at_b[key][~b[key].isnan()], b[key][~b[key].isnan()])
        assert torch.equal(at_a[key][~a[key].isnan()], a[key][~a[key].isnan()])
        assert at_b[key].isnan().equal(b[key].isnan()) and at_a[key].isnan().equal(a[key].isnan())
    assert str(at_a["w"][2].item()) == "-0.0"  # the very same value, sign of zero included
    b_diff = {"w": torch.tensor([2.0, 0.0, 3.0], requires_grad=True), "h": b["h"]}
    a_diff = {"w": torch.tensor([0.0, 1.0, 1.0], requires_grad=True), "h": a["h"]}
    mid = interpolate_state_dict(a_diff, b_diff, 0.5, differentiable=True)
    assert mid["w"].requires_grad and mid["w"].tolist() == [1.0, 0.5, 2.0]


def test_interpolation_refuses_a_non_finite_lambda():
    with pytest.raises(ValueError, match="lam must be finite"):
        interpolate_state_dict({"w": torch.zeros(1)}, {"w": torch.ones(1)}, float("nan"))
    with pytest.raises(TypeError, match="lam must be a number"):
        interpolate_state_dict({"w": torch.zeros(1)}, {"w": torch.ones(1)}, "half")  # type: ignore[arg-type]


def test_resolve_device_checks_the_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device 'gpu0'"):
        resolve_device("gpu0", what="--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_thread_limit_restores(monkeypatch):
    before = torch.get_num_threads()
    with thread_limit(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError):
        with thread_limit(1):
            raise KeyError("x")
    assert torch.get_num_threads() == before
    monkeypatch.setenv("REBASIN_NUM_THREADS", "off")
    with thread_limit():
        assert torch.get_num_threads() == before
    monkeypatch.setenv("REBASIN_NUM_THREADS", "banana")
    with pytest.raises(ValueError, match="REBASIN_NUM_THREADS"):
        with thread_limit():
            pass


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (8, 2), (16, 4), (64, 8)])
def test_default_thread_cap_policy(monkeypatch, cores, expected):
    import os

    from rebasin_callbacks.utils import default_threads

    monkeypatch.delenv("REBASIN_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_threads() == expected
    monkeypatch.setenv("REBASIN_NUM_THREADS", "3")
    assert default_threads() == 3
