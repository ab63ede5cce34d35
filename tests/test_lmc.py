"""Tests of linear mode connectivity: interpolation, barrier / AUC, BN reset, REPAIR, NaN handling, plots."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rebasin_callbacks.lmc import (
    LMCResult,
    barrier_and_auc,
    evaluate_model,
    interpolate,
    lmc_curve,
    plot_lmc,
    repair,
    reset_bn_stats,
)
from rebasin_callbacks.permute import invert_permutation, permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec


def mlp(seed: int, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)]
    return nn.Sequential(*layers)


def convnet(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def mlp_spec(model: nn.Module) -> PermutationSpec:
    axes = {
        "0.weight": ("P0", None),
        "0.bias": ("P0",),
        "2.weight": ("P1", "P0"),
        "2.bias": ("P1",),
        "4.weight": (None, "P1"),
        "4.bias": (None,),
    }
    return PermutationSpec.from_axes(axes, model.state_dict())


def data(n: int = 96, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


# ------------------------------------------------------------------------------------------- interpolate
def test_interpolate_endpoints_exact_and_inputs_untouched() -> None:
    a, b = mlp(0, bn=True), mlp(1, bn=True)
    a[1].num_batches_tracked.fill_(7)
    b[1].running_mean.normal_()
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    at0, at1 = interpolate(a, b, 0.0), interpolate(a, b, 1.0)
    for key, va in a.state_dict().items():
        assert torch.equal(at0.state_dict()[key], va), key
        if va.is_floating_point():
            assert torch.equal(at1.state_dict()[key], b.state_dict()[key]), key
    assert int(at1[1].num_batches_tracked) == 7  # integer buffers come from model_a
    mid = interpolate(a, b, 0.3)
    torch.testing.assert_close(mid[0].weight, 0.7 * a[0].weight + 0.3 * b[0].weight)
    torch.testing.assert_close(mid[1].running_mean, 0.7 * a[1].running_mean + 0.3 * b[1].running_mean)
    assert mid is not a and mid[0].weight.data_ptr() != a[0].weight.data_ptr()
    for k, v in a.state_dict().items():
        assert torch.equal(v, before_a[k])


def test_interpolate_errors_name_the_mismatch() -> None:
    with pytest.raises(
        ValueError, match=r"'weight' axis 0 has size 4 in model_a but 5 in model_b.*\(4, 3\).*\(5, 3\)"
    ):
        interpolate(nn.Linear(3, 4), nn.Linear(3, 5), 0.5)
    with pytest.raises(ValueError, match="model_a has 'bias'.*model_b does not"):
        interpolate(nn.Linear(3, 4), nn.Linear(3, 4, bias=False), 0.5)
    with pytest.raises(ValueError, match="different classes"):
        interpolate(nn.Linear(3, 4), nn.Conv1d(3, 4, 1), 0.5)
    with pytest.raises(ValueError, match="finite"):
        interpolate(nn.Linear(3, 4), nn.Linear(3, 4), float("nan"))
    with pytest.raises(TypeError, match="model_b must be an nn.Module"):
        interpolate(nn.Linear(3, 4), {"weight": torch.zeros(4, 3)}, 0.5)  # type: ignore[arg-type]


def test_interpolate_follows_model_a_dtype_and_leaves_b_alone() -> None:
    a, b = nn.Linear(3, 4).double(), nn.Linear(3, 4)
    b_before = {k: v.clone() for k, v in b.state_dict().items()}
    mid = interpolate(a, b, 0.5)
    assert mid.weight.dtype == torch.float64
    torch.testing.assert_close(mid.weight, 0.5 * a.weight + 0.5 * b.weight.double())
    assert b.weight.dtype == torch.float32
    for k, v in b.state_dict().items():
        assert torch.equal(v, b_before[k])
    half = interpolate(nn.Linear(3, 4), nn.Linear(3, 4).double(), 1.0)
    assert half.weight.dtype == torch.float32


def test_lmc_curve_reset_bn_repair_with_float64_reference() -> None:
    """A float32 model against a float64 reference: computed in model_a's dtype, the reference untouched."""
    a, b = mlp(0, bn=True), mlp(1, bn=True).double()
    b_state = {k: v.clone() for k, v in b.state_dict().items()}
    batches = data()
    mixed = lmc_curve(a, b, batches, n_points=3, reset_bn=True, repair=True, progress=False)
    same = lmc_curve(a, mlp(1, bn=True), batches, n_points=3, reset_bn=True, repair=True, progress=False)
    assert b.state_dict()["0.weight"].dtype == torch.float64
    for k, v in b.state_dict().items():
        assert torch.equal(v, b_state[k]), k
    for k in same.values:
        assert mixed.values[k] == pytest.approx(same.values[k], rel=1e-4, abs=1e-6)
    # the float64 model as model_a: evaluation in float64 with float32 data
    res = lmc_curve(b, a, batches, n_points=3, progress=False)
    assert all(math.isfinite(v) for v in res.values["loss"])
    out = repair(a, b, interpolate(a, b, 0.5), 0.5, batches)
    assert out[0].weight.dtype == torch.float32


def test_evaluate_model_dict_batches() -> None:
    m = mlp(0)
    batches = data()
    pairs = evaluate_model(m, batches)
    dicts = evaluate_model(m, [{"x": x, "y": y} for x, y in batches])
    assert dicts == pytest.approx(pairs)
    with pytest.raises(ValueError, match="targets"):
        evaluate_model(m, [{"x": x} for x, _ in batches])


# ------------------------------------------------------------------------------------------- barrier / AUC
@pytest.mark.parametrize("higher", [False, True])
def test_barrier_and_auc_follow_the_definition(higher: bool) -> None:
    rng = np.random.default_rng(1)
    lam = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0, 1, 7)]))
    values = rng.uniform(0, 3, lam.size)
    chord = (1 - lam) * values[0] + lam * values[-1]
    gap = chord - values if higher else values - chord
    barrier, auc = barrier_and_auc(lam.tolist(), values.tolist(), higher_is_better=higher)
    assert barrier == pytest.approx(max(gap.max(), 0.0))
    assert auc == pytest.approx(float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(lam))))


def test_barrier_of_flat_or_convex_curve_is_zero() -> None:
    assert barrier_and_auc([0, 0.5, 1], [2.0, 1.0, 2.0])[0] == 0.0
    assert barrier_and_auc([0, 0.5, 1], [2.0, 1.0, 2.0])[1] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="increasing"):
        barrier_and_auc([0, 1, 0.5], [1, 2, 3])
    with pytest.raises(ValueError, match="length"):
        barrier_and_auc([0, 1], [1, 2, 3])


def test_result_accuracy_barrier_is_the_drop() -> None:
    res = LMCResult.from_values(
        [0, 0.5, 1], {"loss": [0.2, 1.0, 0.4], "accuracy": [0.9, 0.5, 0.8]}, label="x"
    )
    assert res.barrier == pytest.approx(1.0 - 0.3) and res.barriers["loss"] == res.barrier
    assert res.barriers["accuracy"] == pytest.approx(0.85 - 0.5)
    assert res.auc == pytest.approx(0.5 * 0.7 / 2 * 2)
    assert "accuracy barrier" in res.summary() and res.to_dict()["label"] == "x"


# ------------------------------------------------------------------------------------------- curves
def trained(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int = 150
) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_permuted_copy_has_zero_barrier_after_unpermuting() -> None:
    batches = data()
    a = trained(mlp(0), batches)
    spec = mlp_spec(a)
    perms = random_permutations(spec, torch.Generator().manual_seed(0))
    b = permute(a, spec, perms)
    naive = lmc_curve(a, b, (batches, nn.functional.cross_entropy), n_points=5, progress=False)
    assert naive.barrier > 1e-3  # a permuted copy is not linearly connected to the original
    back = permute(b, spec, {g: invert_permutation(p) for g, p in perms.items()})
    rebased = lmc_curve(a, back, (batches, nn.functional.cross_entropy), n_points=5, progress=False)
    assert rebased.barrier < 1e-5 and abs(rebased.auc) < 1e-5
    assert rebased.barriers["accuracy"] < 1e-9
    # the endpoints are the models themselves
    assert rebased.values["loss"][0] == pytest.approx(evaluate_model(a, batches)["loss"])


def test_evaluate_forms_agree() -> None:
    a, b = mlp(0), mlp(1)
    batches = data()
    pair = lmc_curve(a, b, (batches, nn.functional.cross_entropy), n_points=3, progress=False)
    loader = lmc_curve(a, b, batches, n_points=3, progress=False)
    fn = lmc_curve(a, b, lambda m: evaluate_model(m, batches), n_points=3, progress=False)
    scalar = lmc_curve(a, b, lambda m: evaluate_model(m, batches)["loss"], n_points=3, progress=False)
    assert pair.values == loader.values == fn.values
    assert scalar.values == {"loss": pair.values["loss"]}
    # accuracy by hand at the midpoint
    mid = interpolate(a, b, 0.5).eval()
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert pair.values["accuracy"][1] == pytest.approx(float((mid(x).argmax(1) == y).float().mean()))


def test_nan_evaluation_is_reported_not_averaged() -> None:
    a, b = mlp(0), mlp(1)

    def evaluate(m: nn.Module) -> dict[str, float]:
        w = m[0].weight
        bad = not torch.equal(w, a[0].weight) and not torch.equal(w, b[0].weight)
        return {"loss": math.nan if bad else 1.0, "accuracy": 0.5}

    with pytest.warns(RuntimeWarning, match="NaN"):
        res = lmc_curve(a, b, evaluate, n_points=3, progress=False, label="broken")
    assert res.nonfinite == {"loss": [0.5]}
    assert math.isnan(res.barrier) and math.isnan(res.auc)
    assert res.barriers["accuracy"] == 0.0
    with pytest.raises(ValueError, match=r"non-finite \['loss'\] at lam=0.5"):
        lmc_curve(a, b, evaluate, n_points=3, progress=False, on_nan="raise")


def test_lmc_curve_errors() -> None:
    a, b = mlp(0), mlp(1)
    with pytest.raises(ValueError, match="reset_bn=True needs bn_data"):
        lmc_curve(a, b, lambda m: 1.0, reset_bn=True, progress=False)
    with pytest.raises(ValueError, match="n_points"):
        lmc_curve(a, b, lambda m: 1.0, n_points=1, progress=False)
    with pytest.raises(ValueError, match="increasing"):
        lmc_curve(a, b, lambda m: 1.0, lambdas=[0.0, 0.7, 0.3], progress=False)
    with pytest.raises(TypeError, match="evaluate must"):
        lmc_curve(a, b, 3, progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="evaluate must return"):
        lmc_curve(a, b, lambda m: "low", progress=False)
    with pytest.raises(ValueError, match="different architectures: model_a has '2.weight'"):
        lmc_curve(a, nn.Sequential(nn.Linear(6, 8)), lambda m: 1.0, progress=False)


# ------------------------------------------------------------------------------------------- BN reset
def test_reset_bn_stats_matches_direct_computation_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    model[2].momentum = 0.3
    model.train()
    batches = [torch.randn(20, 6) * 3 + 1 for _ in range(4)]
    reset_bn_stats(model, batches, n_batches=3)
    with torch.no_grad():
        feats = [model[0](x) for x in batches[:3]]  # dropout off: its stats must not leak in
    mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    var = torch.stack([f.var(0, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[2].running_mean, mean)
    torch.testing.assert_close(model[2].running_var, var)
    assert int(model[2].num_batches_tracked) == 3
    assert model[2].momentum == 0.3 and model.training and model[1].training and model[2].training
    model.eval()
    reset_bn_stats(model, batches[:1])
    assert not model.training and not model[2].training
    with pytest.raises(ValueError, match="no batches"):
        reset_bn_stats(model, [])


def test_reset_bn_in_lmc_curve_changes_interpolated_stats() -> None:
    a, b = convnet(0), convnet(1)
    x = torch.randn(48, 1, 8, 8)
    y = torch.randint(0, 3, (48,))
    loader = [(x[:24], y[:24]), (x[24:], y[24:])]
    for m in (a, b):
        reset_bn_stats(m, loader)
    seen: list[torch.Tensor] = []

    def evaluate(m: nn.Module) -> float:
        seen.append(m[1].running_var.clone())
        return evaluate_model(m, loader)["loss"]

    lmc_curve(a, b, evaluate, lambdas=[0.0, 0.5, 1.0], reset_bn=True, bn_data=loader, progress=False)
    mid = interpolate(a, b, 0.5).eval()
    with torch.no_grad():
        direct = torch.stack([mid[0](xb).var((0, 2, 3), unbiased=True) for xb, _ in loader]).mean(0)
    torch.testing.assert_close(seen[1], direct)
    assert not torch.allclose(seen[1], mid[1].running_var, rtol=1e-3)  # interpolated stats were wrong


# ------------------------------------------------------------------------------------------- REPAIR
def _pre_activations(model: nn.Sequential, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    out, h = [], x
    with torch.no_grad():
        for i, layer in enumerate(model):
            h = layer(h)
            if i in indices:
                out.append(h.movedim(1, -1).reshape(-1, h.shape[1]).double())
    return out


@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
def test_repair_matches_interpolated_statistics(kind: str) -> None:
    if kind == "mlp":
        a, b, x = mlp(0), mlp(1), torch.randn(200, 6)
        points = [0, 2]
    else:
        a, b, x = convnet(0), convnet(1), torch.randn(64, 1, 8, 8)
        points = [1, 4]
    for m in (a, b):
        m.eval()
    lam = 0.4
    mid = interpolate(a, b, lam)
    batches = [x[: len(x) // 2], x[len(x) // 2 :]]
    head_before = mid[-1].weight.clone()
    fa, fb, before = (_pre_activations(m, x, points) for m in (a, b, mid))
    repaired = repair(a, b, mid, lam, batches)
    assert repaired is mid
    after = _pre_activations(mid, x, points)
    for ha, hb, h0, h1 in zip(fa, fb, before, after):
        goal_mean = (1 - lam) * ha.mean(0) + lam * hb.mean(0)
        goal_std = (1 - lam) * ha.std(0, unbiased=False) + lam * hb.std(0, unbiased=False)
        assert not torch.allclose(
            h0.std(0, unbiased=False), goal_std, atol=1e-3
        )  # there was something to fix
        torch.testing.assert_close(h1.mean(0), goal_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h1.std(0, unbiased=False), goal_std, atol=1e-4, rtol=1e-4)
    assert torch.equal(mid[-1].weight, head_before)  # the classifier is left alone


def test_repair_at_an_endpoint_keeps_the_function() -> None:
    a, b = convnet(0), convnet(1)
    x = torch.randn(32, 1, 8, 8)
    a.eval()
    fixed = repair(a, b, interpolate(a, b, 0.0), 0.0, [x]).eval()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), a(x), atol=1e-5, rtol=1e-4)


def test_repair_and_reset_in_lmc_curve() -> None:
    a, b = convnet(0), convnet(1)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 3, (64,))
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    for m in (a, b):
        reset_bn_stats(m, loader)
    plain = lmc_curve(a, b, loader, n_points=3, progress=False)
    both = lmc_curve(a, b, loader, n_points=3, reset_bn=True, repair=True, progress=False, label="repair")
    assert both.label == "repair" and len(both.values["loss"]) == 3
    assert both.values["loss"][1] != plain.values["loss"][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmc_curve(a, b, loader, n_points=2, repair=True, progress=False)  # no warning for a plain conv net


# ------------------------------------------------------------------------------------------- plots
def test_plot_lmc_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    naive = LMCResult.from_values(
        [0, 0.5, 1], {"loss": [0.1, 1.5, 0.2], "accuracy": [0.9, 0.4, 0.9]}, label="naive"
    )
    rebased = LMCResult.from_values([0, 0.5, 1], {"loss": [0.1, 0.3, 0.2], "accuracy": [0.9, 0.85, 0.9]})
    path = tmp_path / "lmc.png"
    fig = plot_lmc({"naive": naive, "sinkhorn": rebased, "weight matching": rebased}, path=path, title="t")
    assert len(fig.axes) == 2
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    lines = fig.axes[0].get_lines()
    assert lines[0].get_linestyle() == "--" and lines[1].get_linestyle() == "-"
    assert len(plot_lmc([rebased], metrics=("loss", "ece")).axes) == 1
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_lmc([rebased], metrics=("ece",))
    with pytest.raises(KeyError, match="ece"):
        rebased.plot(metric="ece")
