import copy

import pytest
import torch
from _align_models import cnn_spec, mlp, mlp_spec, same_state, small_cnn
from torch import nn

from rebasin_callbacks.align import AlignResult, align
from rebasin_callbacks.costs import MidCost
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import SpecMismatchError


def _planted(model, spec, seed=0):
    return permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("widths", [[1, 10, 10, 1], [1, 10, 10, 10, 10, 1], [5, 24, 24, 3]])
def test_l2_recovers_a_planted_permutation(widths):
    model = mlp(widths, normal_init=True, seed=1)
    spec = mlp_spec(model)
    target = _planted(model, spec, seed=1)
    result = align(model, target, spec=spec, progress=False, seed=0)
    assert isinstance(result, AlignResult)
    assert same_state(result.model, target)
    assert result.cost == 0.0 and result.seconds > 0


@pytest.mark.parametrize("seed", range(3))
def test_pure_sinkhorn_from_the_identity_recovers_a_small_planted_permutation(seed):
    model = mlp([1, 10, 10, 1], normal_init=True, seed=seed)
    spec = mlp_spec(model)
    target = _planted(model, spec, seed=seed)
    result = align(model, target, spec=spec, init="identity", steps=300, progress=False, seed=seed)
    assert result.steps > 0  # the identity is not the answer: Sinkhorn had to find it
    assert same_state(result.model, target)
    assert result.history["hard_cost"][-1] == 0.0


def test_small_cnn_with_batchnorm_keeps_its_function():
    model = small_cnn(seed=0)
    spec = cnn_spec(model)
    target = _planted(model, spec, seed=4)
    result = align(model, target, spec=spec, init="random", steps=150, progress=False, seed=0)
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    assert same_state(result.model, target)


def test_traced_spec_from_the_first_batch():
    model, reference = small_cnn(seed=0), small_cnn(seed=1)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))]
    result = align(model, reference, data=data, steps=5, progress=False, seed=0)
    assert set(result.perms) == set(result.spec.perm_to_axes)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained_pair():
    """Two tanh MLPs trained from different seeds on y = sin(3x): far apart in weight space."""
    x = torch.linspace(-2, 2, 128).unsqueeze(1)
    y = torch.sin(3 * x)
    models = []
    for seed in (0, 1):
        model = mlp([1, 16, 16, 1], seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        models.append(model)
    return models[0], models[1], (x, y)


@pytest.mark.parametrize("cost", ["mid", "rnd"])
def test_data_costs_lower_the_midpoint_loss(cost, trained_pair):
    a, b, batch = trained_pair
    spec = mlp_spec(a)
    mid = MidCost(nn.functional.mse_loss)

    def midpoint_loss(model):
        from rebasin_callbacks.rebasin import PermutedView

        with torch.no_grad():
            return float(mid(PermutedView(model, model.state_dict()), b, batch))

    result = align(
        a, b, spec=spec, cost=cost, data=[batch], loss_fn=nn.functional.mse_loss, init="identity",
        steps=40, lr=0.1, progress=False, seed=0,
    )  # fmt: skip
    assert midpoint_loss(result.model) < 0.8 * midpoint_loss(a)
    assert min(result.history["hard_cost"]) <= result.history["init_cost"][0]


def test_never_worse_than_the_warm_start():
    a, b = mlp([4, 16, 16, 2], seed=0), mlp([4, 16, 16, 2], seed=1)
    result = align(a, b, spec=mlp_spec(a), steps=30, progress=False, seed=0)
    assert result.cost <= result.history["init_cost"][0]
    assert len(result.history["cost"]) == result.steps == len(result.history["hard_cost"])


def test_seed_makes_it_repeatable_and_inputs_stay_untouched():
    a, b = mlp([4, 16, 16, 2], seed=0), mlp([4, 16, 16, 2], seed=1)
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    spec = mlp_spec(a)
    kwargs = dict(spec=spec, init="random", steps=25, early_stopping=None, progress=False, seed=7)
    r1, r2 = align(a, b, **kwargs), align(a, b, **kwargs)
    assert r1.history["cost"] == r2.history["cost"]
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in r1.perms)
    assert same_state(a, a0) and same_state(b, b0)
    assert r1.model is not a


def test_custom_callable_cost():
    model = mlp([3, 8, 8, 2], seed=0)
    spec = mlp_spec(model)
    target = _planted(model, spec)
    calls = []

    def cost(view, reference, batch):
        calls.append(batch)
        return sum(((view.state[k] - v) ** 2).sum() for k, v in reference.state_dict().items())

    result = align(model, target, spec=spec, cost=cost, init="identity", steps=200, progress=False, seed=0)
    assert calls and calls[0] is None
    assert same_state(result.model, target)


def test_errors_are_clear():
    a, b = mlp([3, 8, 2]), mlp([3, 8, 2], seed=1)
    spec = mlp_spec(a)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))  # no input size to trace from
    with pytest.raises(ValueError, match="spec=.*example_inputs=.*data="):
        align(conv, copy.deepcopy(conv), progress=False)
    with pytest.raises(ValueError, match="needs data"):
        align(a, b, spec=spec, cost="mid", loss_fn=nn.functional.mse_loss, progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        align(a, b, spec=spec, cost="mid", data=[(torch.randn(2, 3), torch.randn(2, 2))], progress=False)
    with pytest.raises(SpecMismatchError, match=r"'0.weight'.*\(8, 3\).*\(9, 3\)"):
        align(a, mlp([3, 9, 2]), spec=spec, progress=False)
    broken = copy.deepcopy(a)
    with torch.no_grad():
        broken[0].weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"model: '0.weight'"):
        align(broken, b, spec=spec, progress=False)
    with pytest.raises(ValueError, match="init must be"):
        align(a, b, spec=spec, init="greedy", progress=False)  # type: ignore[arg-type]

    def nan_after_two(view, reference, batch, calls=[]):  # noqa: B006 - counts calls on purpose
        calls.append(1)
        value = sum(((view.state[k] - v) ** 2).sum() for k, v in reference.state_dict().items())
        return value * float("nan") if len(calls) > 3 else value

    with pytest.raises(FloatingPointError, match=r"at step \d"):
        align(a, b, spec=spec, cost=nan_after_two, init="identity", early_stopping=None, progress=False)


def test_data_costs_work_on_batchnorm_networks_in_eval_mode():
    a, b = small_cnn(seed=0), small_cnn(seed=1)
    before = copy.deepcopy(b)
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(2)]
    for cost in ("mid", "rnd"):
        result = align(a, b, spec=cnn_spec(a), cost=cost, data=data, loss_fn=nn.functional.cross_entropy,
                       steps=4, early_stopping=None, progress=False, seed=0)  # fmt: skip
        assert result.steps == 4 and result.cost <= result.history["init_cost"][0]
    assert same_state(b, before) and not b.training


def test_mid_cost_on_a_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    a = torchvision.models.resnet18(num_classes=3).eval()
    b = torchvision.models.resnet18(num_classes=3).eval()
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,)))]
    result = align(a, b, cost="mid", data=data, loss_fn=nn.functional.cross_entropy, steps=2,
                   progress=False, seed=0)  # fmt: skip
    assert result.steps >= 1 and len(result.perms) == 12


def test_a_refinement_with_nothing_to_gain_stops_early():
    # independent random networks: weight matching is already a local optimum the refinement cannot beat
    a, b = mlp([16, 64, 64, 4], seed=0), mlp([16, 64, 64, 4], seed=1)
    result = align(a, b, spec=mlp_spec(a), progress=False, seed=0)
    assert result.cost == result.history["init_cost"][0]
    assert 1 <= result.steps <= 10  # the step patience alone would allow 30


@pytest.mark.parametrize("method", ["ste", "soft", "anneal", "entropy"])
def test_every_method_recovers_a_small_planted_permutation_and_repeats(method):
    model = mlp([3, 8, 8, 2], normal_init=True, seed=3)
    spec = mlp_spec(model)
    target = _planted(model, spec, seed=3)
    kwargs = dict(spec=spec, init="identity", steps=150, method=method, progress=False, seed=0)
    r1, r2 = align(model, target, **kwargs), align(model, target, **kwargs)
    assert r1.history["cost"] == r2.history["cost"]
    assert r1.cost <= r1.history["init_cost"][0]
    assert same_state(r1.model, target)


def test_ste_sees_the_hard_cost_in_its_forward_pass():
    a, b = mlp([4, 12, 12, 2], seed=0), mlp([4, 12, 12, 2], seed=1)
    result = align(a, b, spec=mlp_spec(a), init="random", method="ste", steps=6, early_stopping=None,
                   progress=False, seed=0)  # fmt: skip
    # step 1 evaluates the initial (random) permutation exactly: the soft value is its hard cost
    assert result.history["cost"][0] == pytest.approx(result.history["init_cost"][0], rel=1e-5)


def test_quality_benchmark_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_benchmark", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out = tmp_path / "quality.md"
    rows = quality.main(["--smoke", "--models", "mlp", "--methods", "wm", "align l2", "--out", str(out)])
    assert [r["method"] for r in rows] == ["wm", "align l2"]
    wm, l2 = rows
    assert l2["l2"] <= wm["l2"] * (1 + 1e-6)  # never farther than its own warm start
    assert all(r["l2"] > 0 and r["loss_barrier"] == r["loss_barrier"] for r in rows)
    text = out.read_text()
    assert "| mlp | 0 | align l2 |" in text and "align l2 strictly closer than wm" in text


def test_the_refinement_beats_weight_matching_on_a_trained_pair():
    from rebasin_callbacks.matching import weight_matching
    from rebasin_callbacks.utils import l2_distance

    x = torch.linspace(-2, 2, 128).unsqueeze(1)
    models = []
    for seed in (0, 1):
        model = mlp([1, 32, 32, 1], seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), torch.sin(3 * x)).backward()
            opt.step()
        models.append(model)
    a, b = models
    spec = mlp_spec(a)
    wm = l2_distance(permute(a, spec, weight_matching(a, b, spec, seed=0)), b)
    result = align(a, b, spec=spec, progress=False, seed=0)  # polish="auto": on for l2 after a warm start
    assert l2_distance(result.model, b) < wm - 1e-3  # a better local optimum than weight matching's
    plain = align(a, b, spec=spec, progress=False, seed=0, polish=False)
    assert plain.steps <= 4 and plain.cost <= plain.history["init_cost"][0]  # cheap when nothing is gained
    with pytest.raises(ValueError, match="polish"):
        align(a, b, spec=spec, progress=False, polish="yes")  # type: ignore[arg-type]


def test_align_caps_cpu_threads_inside_and_restores_them(monkeypatch):
    import importlib

    module = importlib.import_module("rebasin_callbacks.align")  # the module, not the exported function
    seen = []
    real = module._initial_permutations

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_initial_permutations", recording)
    before = torch.get_num_threads()
    a, b = mlp([4, 8, 3], seed=0), mlp([4, 8, 3], seed=1)
    align(a, b, spec=mlp_spec(a), steps=2, progress=False, threads=1)
    align(a, b, spec=mlp_spec(a), steps=2, progress=False, threads=None)
    assert seen == [1, before]
    assert torch.get_num_threads() == before


def test_a_model_with_a_linear_stem_aligns_without_spec_or_inputs():
    a = mlp([3, 8, 2])
    planted = permute(a, mlp_spec(a), random_permutations(mlp_spec(a), torch.Generator().manual_seed(0)))
    with pytest.warns(UserWarning, match="tracing on random inputs of shape"):
        result = align(planted, a, progress=False, seed=0)
    assert same_state(result.model, a)


def test_progress_names_the_phases_and_is_quiet_when_off(capsys):
    a = mlp([3, 8, 2])
    b = mlp([3, 8, 2], seed=1)
    align(a, b, example_inputs=torch.randn(2, 3), steps=2, progress=True)
    err = capsys.readouterr().err
    assert "align: tracing the permutation spec of Sequential" in err
    assert "align: weight matching warm start (1 group)" in err
    align(a, b, example_inputs=torch.randn(2, 3), steps=2, progress=False)
    assert capsys.readouterr().err == ""


def test_align_never_returns_worse_than_the_model_as_it_is():
    # A start far worse than leaving the model alone: the identity is a candidate and wins.
    a = mlp([4, 16, 16, 3], seed=0)
    spec = mlp_spec(a)
    start = random_permutations(spec, torch.Generator().manual_seed(0))
    result = align(a, copy.deepcopy(a), spec=spec, init=start, steps=0, progress=False)
    assert all(torch.equal(p, torch.arange(len(p))) for p in result.perms.values())
    assert result.cost == 0.0 and result.history["identity_cost"] == [0.0]
    assert result.history["init_cost"][0] > 0
