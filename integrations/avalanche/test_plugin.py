"""ReBasinPlugin with Avalanche's own strategies (EWC, LwF, Naive + replay) and its metrics in loggers."""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("avalanche")

from avalanche.benchmarks import tensors_benchmark  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.logging import BaseLogger, TextLogger  # noqa: E402
from avalanche.training import EWC, LwF, Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from rebasin_callbacks.avalanche import (  # noqa: E402
    PAPER_SETTINGS,
    ReBasinPlugin,
    ReBasinStrategy,
    released_replay,
    released_settings,
)
from rebasin_callbacks.spec import PermutationSpec  # noqa: E402


def _mlp(seed: int = 0) -> tuple[nn.Module, PermutationSpec]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    axes = {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)}
    return net, PermutationSpec.from_axes(axes, net.state_dict())


def _bench(n_exp: int = 2, n: int = 48) -> Any:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(n_exp)]
    return tensors_benchmark(data, data, task_labels=[0] * n_exp)


class _Recorder(BaseLogger):
    """A custom logger: every metric value it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, float] = {}

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        self.values[name] = value


class _BatchSizes(SupervisedPlugin):
    def __init__(self, plugin: ReBasinPlugin) -> None:
        super().__init__()
        self.plugin, self.sizes = plugin, {}  # type: tuple[ReBasinPlugin, dict[int, list[int]]]

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        exp = strategy.experience.current_experience
        self.sizes.setdefault(exp, []).append((len(strategy.mb_x), self.plugin.active))


def _state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _train(strategy: Any, bench: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for exp in bench.train_stream:
            strategy.train(exp, eval_streams=[])


def test_plugin_with_ewc_trains_two_experiences_and_logs_rebasin_quantities() -> None:
    net, spec = _mlp()
    recorder, text = _Recorder(), io.StringIO()
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True), loggers=[recorder, TextLogger(text)], strict_checks=False
    )
    plugin = ReBasinPlugin(spec=spec, lr_delta=0.5)
    strategy = EWC(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        ewc_lambda=10.0,
        train_mb_size=16,
        train_epochs=2,
        evaluator=evaluator,
        plugins=[plugin],
    )
    bench = _bench()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy.train(bench.train_stream[0], eval_streams=[])
        after_first = _state(net)
        strategy.train(bench.train_stream[1], eval_streams=[])
        strategy.eval(bench.test_stream)
    assert plugin.incremental is not None and plugin.incremental.episodes_done == 1
    assert strategy.model is net and not plugin.active
    assert any(not torch.equal(v, after_first[k]) for k, v in net.state_dict().items())
    # EWC saw the fused model of both experiences (its importances are keyed by the model's own names)
    assert set(strategy.plugins[1].importances) == {0, 1}
    assert set(strategy.plugins[1].importances[1]) == {n for n, _ in net.named_parameters()}
    # the re-basin quantities reached the custom logger and the TextLogger, with the values recorded
    (hist,) = plugin.history
    for key in ("cost", "units_moved", "moved_fraction", "delta_norm"):
        name = f"ReBasin/{key}/Exp001"
        assert recorder.values[name] == pytest.approx(hist[key])
        assert name in text.getvalue()
    assert hist["delta_norm"] > 0 and hist["cost"] > 0
    assert 0 <= hist["units_moved"] <= 16


def test_plugin_with_replay_sees_memory_samples_in_rebasin_steps() -> None:
    net, spec = _mlp()
    plugin = ReBasinPlugin(spec=spec)
    sizes = _BatchSizes(plugin)
    strategy = Naive(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        train_mb_size=16,
        evaluator=None,
        plugins=[plugin, released_replay(3, per_experience=10), sizes],
    )
    _train(strategy, _bench(3))
    assert plugin.incremental is not None and plugin.incremental.episodes_done == 2
    # experience 0 is trained normally; later ones by re-basin, each step with 16 new samples and up to 16
    # memory samples (10 per past experience in memory)
    assert {active for _, active in sizes.sizes[0]} == {False}
    for exp in (1, 2):
        assert {active for _, active in sizes.sizes[exp]} == {True}
        assert max(n for n, _ in sizes.sizes[exp]) == 16 + min(16, 10 * exp)
    storage = strategy.plugins[1].storage_policy
    assert [len(b.buffer) for b in storage.buffer_groups.values()] == [10, 10, 10]


def test_plugin_with_lwf_distils_during_rebasin_experiences() -> None:
    net, spec = _mlp()
    plugin = ReBasinPlugin(spec=spec)
    losses: list[float] = []

    class Loss(SupervisedPlugin):
        def after_backward(self, strategy: Any, **kwargs: Any) -> None:
            if plugin.active:
                losses.append(float(strategy.loss))

    lwf = LwF(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        criterion=nn.CrossEntropyLoss(),
        alpha=5.0,
        temperature=2.0,
        train_mb_size=16,
        evaluator=None,
        plugins=[plugin, Loss()],
    )
    _train(lwf, _bench())
    assert plugin.incremental is not None and plugin.incremental.episodes_done == 1
    assert losses and all(v == v for v in losses)


def test_plugin_trains_exactly_like_the_strategy() -> None:
    bench = _bench()
    results = []
    for kind in ("plugin", "strategy"):
        net, spec = _mlp()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        torch.manual_seed(5)
        if kind == "plugin":
            strategy: Any = Naive(
                model=net, optimizer=opt, train_mb_size=16, evaluator=None, plugins=[ReBasinPlugin(spec=spec)]
            )
        else:
            strategy = ReBasinStrategy(model=net, optimizer=opt, spec=spec, train_mb_size=16, evaluator=None)
        _train(strategy, bench)
        results.append(_state(net))
    for k, v in results[0].items():
        torch.testing.assert_close(v, results[1][k], rtol=0, atol=0)


def test_strategy_defaults_are_naive_and_paper_settings_are_named() -> None:
    net, spec = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ReBasinStrategy(model=net, optimizer=torch.optim.SGD(net.parameters(), 0.1), spec=spec)
        naive = Naive(model=net, optimizer=torch.optim.SGD(net.parameters(), 0.1))
        paper = ReBasinStrategy(
            model=net, optimizer=torch.optim.SGD(net.parameters(), 0.1), spec=spec, **PAPER_SETTINGS
        )
    for attr in ("train_mb_size", "train_epochs", "eval_mb_size"):
        assert getattr(ours, attr) == getattr(naive, attr)
    assert (paper.train_mb_size, paper.train_epochs, paper.eval_mb_size) == (500, 5, 500)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"alpha": 1.5}, "alpha"), ({"beta": -1.0}, "beta")],
)
def test_plugin_bad_arguments_are_rejected_at_construction(kwargs: dict[str, Any], match: str) -> None:
    _, spec = _mlp()
    with pytest.raises(ValueError, match=match):
        ReBasinPlugin(**{"spec": spec, **kwargs})


@pytest.mark.parametrize(("n", "per"), [(0, 50), (20, 0)])
def test_released_replay_rejects_bad_sizes(n: int, per: int) -> None:
    with pytest.raises(ValueError, match="num_experiences|per_experience"):
        released_replay(n, per)


def test_released_settings_clamp_is_a_keyword() -> None:
    assert released_settings()["incremental_kwargs"]["delta_grad_clip"] == 1e-3
    assert released_settings(delta_grad_clip=None)["incremental_kwargs"]["delta_grad_clip"] is None
    with pytest.raises(ValueError, match="delta_grad_clip"):
        released_settings(delta_grad_clip=-1.0)


def test_without_spec_or_example_inputs_the_first_batch_is_traced(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    strategy = ReBasinStrategy(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), train_mb_size=16, evaluator=None
    )
    with pytest.raises(RuntimeError, match="first training batch"):
        strategy.incremental  # noqa: B018 - nothing to trace from yet
    with caplog.at_level("INFO", logger="rebasin_callbacks.avalanche"):
        _train(strategy, _bench())
    assert "traced from the first training batch (inputs of shape (2, 6))" in caplog.text
    assert strategy.incremental.episodes_done == 1
    assert len(strategy.incremental.spec) == 1  # the hidden layer's group


def test_rebasin_metrics_are_printed_during_their_own_experience_and_for_the_last() -> None:
    net, spec = _mlp()
    text = io.StringIO()
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True), loggers=[TextLogger(text)], strict_checks=False
    )
    strategy = Naive(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
        train_mb_size=16, train_epochs=1, evaluator=evaluator, plugins=[ReBasinPlugin(spec=spec)],
    )  # fmt: skip
    _train(strategy, _bench(n_exp=3))  # no evaluation: nothing else makes the text logger print
    out = text.getvalue()
    starts = [out.index(f"training on experience {k}") for k in (1, 2)]
    for exp, (begin, end) in ((1, (starts[0], starts[1])), (2, (starts[1], len(out)))):
        for key in ("cost", "units_moved", "moved_fraction", "delta_norm"):
            name = f"ReBasin/{key}/Exp{exp:03d}"
            assert out.count(name) == 1, (name, out)
            assert begin < out.index(name) < end, (name, out)  # printed inside its own experience
