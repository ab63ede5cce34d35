"""Faults in re-basin incremental learning: a failed or interrupted experience must not break the next one."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("avalanche")

from avalanche.benchmarks import tensors_benchmark  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402

from rebasin_callbacks.avalanche import ReBasinStrategy  # noqa: E402
from rebasin_callbacks.spec import PermutationSpec  # noqa: E402


def _mlp() -> tuple[nn.Module, PermutationSpec]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    axes = {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)}
    return net, PermutationSpec.from_axes(axes, net.state_dict())


def _experiences(features: list[int]) -> list[Any]:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(48, f, generator=g), torch.randint(0, 3, (48,), generator=g)) for f in features]
    bench = tensors_benchmark(data, data, task_labels=[0] * len(data))
    return list(bench.train_stream)


class _InterruptAt(SupervisedPlugin):
    """Raises KeyboardInterrupt at the given training iteration of experience ``exp``."""

    def __init__(self, exp: int, iteration: int = 1):
        super().__init__()
        self.exp, self.iteration, self.fired = exp, iteration, False

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if (
            not self.fired
            and strategy.clock.train_exp_counter == self.exp
            and strategy.clock.train_epoch_iterations == self.iteration
        ):
            self.fired = True
            raise KeyboardInterrupt


def _strategy(net: nn.Module, spec: PermutationSpec, plugins: list[Any] | None = None) -> ReBasinStrategy:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReBasinStrategy(
            model=net,
            optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
            spec=spec,
            train_mb_size=16,
            train_epochs=1,
            evaluator=None,
            plugins=plugins,
        )


def _state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_next_experience_trains_after_a_shape_error() -> None:
    net, spec = _mlp()
    strategy = _strategy(net, spec)
    first, bad, good = _experiences([6, 7, 6])
    strategy.train(first, eval_streams=[])
    before = _state(net)
    with pytest.raises(RuntimeError):
        strategy.train(bad, eval_streams=[])  # 7 features into Linear(6, 16)
    # the failed experience leaves the model as it was
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    strategy.train(good, eval_streams=[])
    assert strategy.model is net
    assert strategy.incremental.episodes_done == 1
    assert not strategy.incremental.in_episode
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # the user's optimizer is back, over the model's own parameters
    ids = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert ids == {id(p) for p in net.parameters()}


def test_next_experience_trains_after_ctrl_c() -> None:
    net, spec = _mlp()
    strategy = _strategy(net, spec, plugins=[_InterruptAt(exp=1)])
    first, second, third = _experiences([6, 6, 6])
    strategy.train(first, eval_streams=[])
    before = _state(net)
    with pytest.raises(KeyboardInterrupt):
        strategy.train(second, eval_streams=[])
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    strategy.train(third, eval_streams=[])
    assert strategy.incremental.episodes_done == 1
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_eval_after_an_interrupted_experience_uses_the_last_fused_model() -> None:
    net, spec = _mlp()
    strategy = _strategy(net, spec, plugins=[_InterruptAt(exp=1)])
    first, second = _experiences([6, 6])
    strategy.train(first, eval_streams=[])
    with pytest.raises(KeyboardInterrupt):
        strategy.train(second, eval_streams=[])
    strategy.eval([first])
    assert strategy.model is net
    assert not strategy.incremental.in_episode


def test_abort_episode_alone_is_enough_to_recover() -> None:
    net, spec = _mlp()
    strategy = _strategy(net, spec, plugins=[_InterruptAt(exp=1)])
    first, second, third = _experiences([6, 6, 6])
    strategy.train(first, eval_streams=[])
    with pytest.raises(KeyboardInterrupt):
        strategy.train(second, eval_streams=[])
    strategy.incremental.abort_episode()  # what a user might try by hand
    strategy.train(third, eval_streams=[])
    assert strategy.incremental.episodes_done == 1


@pytest.mark.parametrize(
    ("kwargs", "width", "match"),
    [
        (dict(incremental_kwargs=dict(tau=-1.0)), 16, r"tau must be a number in \[0.001, 1000.0\]"),
        (dict(incremental_kwargs=dict(n_iters=0)), 16, "n_iters must be an int >= 1"),
        ({}, 0, "no permutation groups"),  # a model without hidden units
    ],
)
def test_strategy_settings_and_models_are_refused_at_construction(kwargs, width, match) -> None:
    from rebasin_callbacks.avalanche import ReBasinStrategy

    layers = [nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3)] if width else [nn.Linear(6, 3)]
    model = nn.Sequential(*layers)
    with pytest.raises(ValueError, match=match):
        ReBasinStrategy(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            example_inputs=torch.zeros(2, 6),
            **kwargs,
        )
