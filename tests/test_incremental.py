"""Unit tests of re-basin incremental learning (Procedure 1): fusion formula, episode lifecycle, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rebasin_callbacks.incremental import (
    JointOptimizer,
    ReBasinIncremental,
    extend_spec_to_heads,
    fuse_states,
)
from rebasin_callbacks.permute import permute_state_dict, random_permutations
from rebasin_callbacks.spec import PermutationSpec


def _mlp(seed: int = 0, bn: bool = False) -> tuple[nn.Module, PermutationSpec]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    axes: dict[str, tuple[str | None, ...]] = {"0.weight": ("H", None), "0.bias": ("H",)}
    if bn:
        layers.append(nn.BatchNorm1d(16))
        axes.update(
            {
                "1.weight": ("H",),
                "1.bias": ("H",),
                "1.running_mean": ("H",),
                "1.running_var": ("H",),
                "1.num_batches_tracked": (),
            }
        )
    layers += [nn.ReLU(), nn.Linear(16, 3)]
    last = len(layers) - 1
    axes.update({f"{last}.weight": (None, "H"), f"{last}.bias": (None,)})
    net = nn.Sequential(*layers)
    return net, PermutationSpec.from_axes(axes, net.state_dict())


def _batches(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def test_fuse_states_formula_both_readings() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    perm = {"w": torch.tensor([2.0, 1.0]), "n": torch.tensor(3)}
    delta = {"w": torch.tensor([0.1, -0.1])}
    out = fuse_states(base, perm, delta, alpha=0.25, fusion="permuted")
    torch.testing.assert_close(out["w"], 0.75 * base["w"] + 0.25 * perm["w"] + delta["w"])
    assert out["n"].item() == 3
    lit = fuse_states(base, perm, delta, alpha=0.25, fusion="literal")
    torch.testing.assert_close(lit["w"], base["w"] + delta["w"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_out_of_range_is_rejected(alpha: float) -> None:
    net, spec = _mlp()
    with pytest.raises(ValueError, match="alpha"):
        ReBasinIncremental(net, spec=spec, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        fuse_states({}, {}, {}, alpha=alpha)


def test_bad_arguments_name_the_parameter() -> None:
    net, spec = _mlp()
    with pytest.raises(ValueError, match="beta"):
        ReBasinIncremental(net, spec=spec, beta=-1.0)
    with pytest.raises(ValueError, match="fusion"):
        ReBasinIncremental(net, spec=spec, fusion="average")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spec= or example_inputs="):
        ReBasinIncremental(net)
    inc = ReBasinIncremental(net, spec=spec)
    with pytest.raises(RuntimeError, match="begin_episode"):
        inc.end_episode()
    inc.begin_episode()
    with pytest.raises(ValueError, match="batch"):
        inc.step(torch.randn(4, 6), F.cross_entropy)
    with pytest.raises(RuntimeError, match="twice"):
        inc.begin_episode()


def test_spec_without_groups_is_rejected() -> None:
    net = nn.Linear(4, 2)  # no hidden layer: nothing to permute
    spec = PermutationSpec.from_axes({"weight": (None, None), "bias": (None,)}, net.state_dict())
    with pytest.raises(ValueError, match="no permutation groups"):
        ReBasinIncremental(net, spec=spec)
    # a spec function is only called at the episode start: the error comes there
    inc = ReBasinIncremental(net, spec=lambda m: spec)
    with pytest.raises(ValueError, match="Linear.*no permutation groups"):
        inc.begin_episode()


def test_episode_starts_at_theta_and_trains_only_p_and_delta() -> None:
    net, spec = _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inc = ReBasinIncremental(net, spec=spec, seed=0)
    inc.begin_episode()
    x = torch.randn(5, 6)
    # P starts at the identity and delta is ~1e-6: the training model is theta_{e-1}
    torch.testing.assert_close(inc(x), net(x), atol=2e-3, rtol=0)
    assert all(0.0 <= float(d.detach().min()) and float(d.detach().max()) <= 1e-6 for d in inc.delta.values())
    ids = {id(p) for p in inc.trainable_parameters()}
    assert not ids & {id(p) for p in net.parameters()}
    for batch in _batches():
        inc.step(batch, F.cross_entropy)
    # the model itself is untouched until the fusion; the residual and the scores moved
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert max(float(d.abs().max()) for d in inc.delta.values()) > 1e-4
    assert inc.penalty() > 0


def test_end_episode_writes_the_fused_model() -> None:
    net, spec = _mlp()
    theta = {k: v.clone() for k, v in net.state_dict().items()}
    inc = ReBasinIncremental(net, spec=spec, alpha=0.3)
    inc.begin_episode()
    for batch in _batches():
        inc.step(batch, F.cross_entropy)
    assert inc.rebasin is not None
    perms = inc.rebasin.project()
    delta = {k: d.detach().clone() for k, d in inc.delta.items()}
    fused = inc.end_episode()
    expected = fuse_states(theta, permute_state_dict(theta, spec, perms), delta, alpha=0.3)
    for k in theta:
        torch.testing.assert_close(fused[k], expected[k])
        torch.testing.assert_close(net.state_dict()[k], expected[k])
    assert inc.episodes_done == 1 and not inc.in_episode


def test_hard_permutation_fusion_preserves_function() -> None:
    # With delta = 0, a hard permutation and alpha = 1 the fused model computes exactly what theta did.
    net, spec = _mlp(bn=True)
    net.eval()
    theta = net.state_dict()
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    fused = fuse_states(theta, permute_state_dict(theta, spec, perms), {}, alpha=1.0)
    x = torch.randn(7, 6)
    ref = net(x)
    net.load_state_dict(fused)
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)


def test_batchnorm_buffers_are_not_updated_in_place() -> None:
    net, spec = _mlp(bn=True)
    mean = net[1].running_mean.clone()
    inc = ReBasinIncremental(net, spec=spec)
    inc.begin_episode()
    net.train()
    inc.step(_batches(1)[0], F.cross_entropy)
    torch.testing.assert_close(net[1].running_mean, mean)
    inc.end_episode()
    assert net[1].num_batches_tracked.dtype == torch.long


def test_fit_episode_learns_a_new_task() -> None:
    torch.manual_seed(0)
    net, spec = _mlp()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    before = F.cross_entropy(net(x), y).item()
    inc = ReBasinIncremental(net, spec=spec, alpha=0.5, beta=1e-3, lr_delta=0.5)
    history = inc.fit_episode(data, F.cross_entropy, epochs=10)
    assert len(history["loss"]) == 40
    with torch.no_grad():
        after = F.cross_entropy(net(x), y).item()
    assert after < 0.8 * before


def test_custom_optimizers_and_joint_optimizer_state() -> None:
    net, spec = _mlp()
    made: list[str] = []

    def perm_opt(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        made.append("perm")
        return torch.optim.SGD(params, lr=0.01)

    inc = ReBasinIncremental(net, spec=spec, perm_optimizer=perm_opt)
    inc.begin_episode()
    opt = inc.optimizer()
    assert made == ["perm"] and isinstance(opt, JointOptimizer)
    assert isinstance(opt.optimizers[0], torch.optim.SGD) and isinstance(opt.optimizers[1], torch.optim.SGD)
    inc.step(_batches(1)[0], F.cross_entropy)
    state = opt.state_dict()
    opt.load_state_dict(state)
    with pytest.raises(ValueError, match="optimizers"):
        opt.load_state_dict({"optimizers": state["optimizers"][:1]})


def test_state_dict_round_trip() -> None:
    net, spec = _mlp()
    inc = ReBasinIncremental(net, spec=spec, alpha=0.2, beta=0.01, fusion="literal")
    inc.fit_episode(_batches(1), F.cross_entropy, epochs=1)
    other = ReBasinIncremental(net, spec=spec)
    other.load_state_dict(inc.state_dict())
    assert (other.alpha, other.beta, other.fusion, other.episodes_done) == (0.2, 0.01, "literal", 1)


def test_extend_spec_to_heads_covers_every_head() -> None:
    trunk = nn.Linear(4, 8)
    heads = nn.ModuleDict({str(t): nn.Linear(8, 2) for t in range(3)})
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    state = model.state_dict()
    spec = PermutationSpec.from_axes(
        {
            "trunk.weight": ("H", None),
            "trunk.bias": ("H",),
            "heads.0.weight": (None, "H"),
            "heads.0.bias": (None,),
        },
        state,
    )
    full = extend_spec_to_heads(spec, state, "heads.")
    for t in range(3):
        assert full.axes_to_perm[f"heads.{t}.weight"] == (None, "H")
    assert ("heads.2.weight", 1) in full.perm_to_axes["H"]


def test_incremental_follows_a_spec_function_for_growing_models() -> None:
    net, spec = _mlp()
    calls: list[int] = []

    def spec_fn(model: nn.Module) -> PermutationSpec:
        calls.append(1)
        return spec

    inc = ReBasinIncremental(net, spec=spec_fn)
    inc.fit_episode(_batches(1), F.cross_entropy, epochs=1)
    inc.fit_episode(_batches(1), F.cross_entropy, epochs=1)
    assert len(calls) == 2


def test_delta_grad_clip_bounds_every_residual_step() -> None:
    net, spec = _mlp()
    lr, clip = 0.5, 1e-3
    inc = ReBasinIncremental(net, spec=spec, beta=0.0, lr_delta=lr, delta_grad_clip=clip)
    inc.begin_episode()
    before = {k: d.detach().clone() for k, d in inc.delta.items()}
    x, y = _batches(1)[0]
    inc.step((x * 100, y), F.cross_entropy)  # large inputs: unclipped gradients are far above 1e-3
    moved = max(float((inc.delta[k].detach() - before[k]).abs().max()) for k in before)
    assert moved == pytest.approx(lr * clip, rel=1e-4)
    # without the clamp the same step moves the residual much further
    free = ReBasinIncremental(net, spec=spec, beta=0.0, lr_delta=lr)
    free.begin_episode()
    start = {k: d.detach().clone() for k, d in free.delta.items()}
    free.step((x * 100, y), F.cross_entropy)
    assert max(float((free.delta[k].detach() - start[k]).abs().max()) for k in start) > 100 * lr * clip
    with pytest.raises(ValueError, match="delta_grad_clip"):
        ReBasinIncremental(net, spec=spec, delta_grad_clip=-1.0)


def test_soft_start_is_not_the_identity() -> None:
    """init_scale=1, init_noise=0.1 (the released code's start): the soft P of 16 units is far from I."""
    net, spec = _mlp()
    g = torch.Generator().manual_seed(0)
    soft = ReBasinIncremental(net, spec=spec, init_scale=1.0, init_noise=0.1, seed=g)
    soft.begin_episode()
    assert soft.rebasin is not None
    (p,) = [t.detach() for t in soft.rebasin.soft_permutations().values()]
    assert float(p.diagonal().mean()) < 0.5
    sharp = ReBasinIncremental(net, spec=spec)
    sharp.begin_episode()
    assert sharp.rebasin is not None
    (q,) = [t.detach() for t in sharp.rebasin.soft_permutations().values()]
    assert float(q.diagonal().mean()) > 0.99


def _benchmark_module() -> Any:
    """``benchmarks/incremental.py`` (a script, not a package) loaded by path."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "incremental.py"
    spec = importlib.util.spec_from_file_location("_bench_incremental", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_forgetting_definitions_on_a_hand_matrix() -> None:
    nan = float("nan")
    acc = [[0.9, nan, nan], [0.95, 0.8, nan], [0.7, 0.6, 0.85]]
    r = _benchmark_module().RunResult("x", acc)
    assert r.accuracy == pytest.approx((0.7 + 0.6 + 0.85) / 3)
    # Avalanche: right after the task's own experience; supplement: the best before the end
    assert r.forgetting_avalanche == pytest.approx(((0.9 - 0.7) + (0.8 - 0.6)) / 2)
    assert r.forgetting == pytest.approx(((0.95 - 0.7) + (0.8 - 0.6)) / 2)
    assert r.plasticity == pytest.approx((0.9 + 0.8 + 0.85) / 3)


def test_benchmark_forgetting_equals_avalanche_stream_forgetting() -> None:
    pytest.importorskip("avalanche")
    import warnings

    from avalanche.benchmarks import tensors_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        x = torch.randn(60, 6, generator=g)
        data.append((x, (x @ torch.randn(6, 3, generator=g)).argmax(1)))
    bench = tensors_benchmark(data, data, task_labels=[0] * 4)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True), forgetting_metrics(stream=True), loggers=[]
        )
        strategy = Naive(
            model=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=10,
            train_epochs=3,
            evaluator=evaluator,
        )
        acc = []
        for e, exp in enumerate(bench.train_stream):
            strategy.train(exp, eval_streams=[])
            res = strategy.eval(bench.test_stream[: e + 1])
            row = [res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{t:03d}"] for t in range(e + 1)]
            acc.append(row + [float("nan")] * (3 - e))
    r = _benchmark_module().RunResult("naive", acc)
    assert r.forgetting_avalanche == pytest.approx(res["StreamForgetting/eval_phase/test_stream"], abs=1e-12)
    assert r.forgetting_avalanche > 0.05  # the check has something to compare


@pytest.mark.slow
def test_benchmark_authors_protocol_smoke(tmp_path: Any) -> None:
    pytest.importorskip("avalanche")
    payload = _benchmark_module().main(
        ["--smoke", "--quiet", "--threads", "1", "--out", str(tmp_path / "authors")]
    )
    assert set(payload["summary"]) == {"rebasin", "finetune", "joint"}
    run = payload["runs"]["rebasin"][0]
    assert len(run["acc_matrix"]) == 3 and len(run["rebasin_history"]) == 2
    assert 0.0 <= payload["summary"]["rebasin"]["accuracy"]["mean"] <= 1.0
    assert (tmp_path / "authors.json").exists()


def test_benchmark_merge_pools_seeds_and_refuses_duplicates(tmp_path: Any) -> None:
    import json

    bench = _benchmark_module()
    nan = float("nan")

    def payload(seed: int, final: float) -> dict[str, Any]:
        run = {"seed": seed, "seconds": 1.0, "acc_matrix": [[0.9, nan], [final, 0.8]]}
        return {"args": {"steps": 2, "test_images": None, "episodes": 2}, "runs": {"finetune": [run]}}

    paths = []
    for seed, final in ((0, 0.5), (1, 0.7)):
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(payload(seed, final)))
    merged = bench.main(["--merge", *map(str, paths), "--out", str(tmp_path / "all")])
    acc = merged["summary"]["finetune"]["accuracy"]
    assert acc["mean"] == pytest.approx(((0.5 + 0.8) / 2 + (0.7 + 0.8) / 2) / 2)
    assert acc["std"] == pytest.approx(0.1 / 2)
    assert merged["summary"]["finetune"]["forgetting_avalanche"]["mean"] == pytest.approx(0.3)
    assert json.loads((tmp_path / "all.json").read_text())["summary"] == merged["summary"]
    with pytest.raises(SystemExit, match="appears twice"):
        bench.main(["--merge", str(paths[0]), str(paths[0])])
