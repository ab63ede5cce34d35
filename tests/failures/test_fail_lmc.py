"""LMC, BatchNorm reset and REPAIR: bad input fails with a clear error before anything is changed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rebasin_callbacks.lmc import evaluate_model, interpolate, lmc_curve, repair, reset_bn_stats
from rebasin_callbacks.spec import SpecMismatchError


def _net(seed: int, width: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 3))


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(m: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


def _data(n: int = 2):
    return [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(n)]


def test_interpolate_other_width_names_key_axis_and_shapes():
    a, b = _net(0), _net(1, width=6)
    snap_a, snap_b = _snapshot(a), _snapshot(b)
    with pytest.raises(SpecMismatchError, match=r"'0.weight' axis 0 has size 8 in model_a but 6 in model_b"):
        interpolate(a, b, 0.5)
    assert _same(a, snap_a) and _same(b, snap_b)


def test_repair_with_a_mismatching_model_changes_nothing():
    a, b, mid = _net(0), _net(1, width=6), _net(2)
    snap = _snapshot(mid)
    with pytest.raises(
        SpecMismatchError, match=r"repair: '0.weight' axis 0 has size 6 in model_b but 8 in interpolated"
    ):
        repair(a, b, mid, 0.5, _data())
    assert _same(mid, snap)


def test_reset_bn_without_batches_changes_nothing():
    net = _net(0)
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    snap = _snapshot(net)
    with pytest.raises(ValueError, match="reset_bn_stats: the data yielded no batches"):
        reset_bn_stats(net, [])
    with pytest.raises(ValueError, match=">= 1"):
        reset_bn_stats(net, _data(), n_batches=0)
    assert _same(net, snap)


def test_lmc_curve_reset_bn_with_an_empty_loader_fails_before_evaluating():
    calls: list[int] = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        return 0.0

    with pytest.raises(ValueError, match="lmc_curve: the data yielded no batches"):
        lmc_curve(_net(0), _net(1), evaluate, reset_bn=True, bn_data=[], progress=False)
    assert not calls


def test_dict_batches_without_known_keys_are_named():
    with pytest.raises(TypeError, match=r"input key.*\['pixels', 'cls'\]"):
        evaluate_model(_net(0), [{"pixels": torch.randn(4, 4), "cls": torch.zeros(4, dtype=torch.long)}])


def test_interpolate_does_not_modify_a_model_on_another_dtype():
    a, b = _net(0), _net(1).double()
    snap = _snapshot(b)
    interpolate(a, b, 0.3)
    lmc_curve(a, b, _data(), n_points=3, reset_bn=True, progress=False)
    assert _same(b, snap) and b[0].weight.dtype == torch.float64


# --------------------------------------------------------------------------- non-finite values on a curve
def _linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["model_a", "model_b"])
def test_lmc_curve_refuses_non_finite_weights_naming_model_and_key(which, value):
    a, b = _linear(0), _linear(1)
    with torch.no_grad():
        (a if which == "model_a" else b).bias[1] = value
    calls: list[int] = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        return 0.0

    with pytest.raises(ValueError, match=rf"lmc_curve: {which}: 'bias' holds 1 NaN/inf"):
        lmc_curve(a, b, evaluate, n_points=3, progress=False)
    assert not calls


def test_overflowing_outputs_give_nan_accuracy_and_barriers_never_zero():
    # finite weights whose logits overflow float32: every loss is NaN/inf, accuracy must not look fine
    a, b = _linear(0), _linear(1)
    with torch.no_grad():
        a.weight.fill_(3e38)
        b.weight.fill_(-3e38)
    data = [(torch.full((8, 4), 10.0), torch.randint(0, 3, (8,)))]
    metrics = evaluate_model(a, data)
    assert math.isnan(metrics["accuracy"])
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        result = lmc_curve(a, b, data, n_points=3, progress=False)
    assert math.isnan(result.barrier) and math.isnan(result.barriers["accuracy"])
    assert result.nonfinite["accuracy"] == [0.0, 1.0]  # the midpoint's weights are 0
    with pytest.raises(ValueError, match=r"non-finite \[.*'accuracy'\] at lam=0.0"):
        lmc_curve(a, b, data, n_points=3, progress=False, on_nan="raise")


def test_one_nan_output_row_makes_accuracy_nan():
    model = _linear(0)
    x = torch.randn(8, 4)
    x[3, 0] = float("nan")
    assert math.isnan(evaluate_model(model, [(x, torch.zeros(8, dtype=torch.long))])["accuracy"])
