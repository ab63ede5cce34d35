"""align() on wrapped models, unusual inputs and bad settings: it follows the model or fails at once with an
error that names the problem, and never modifies its inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from _align_models import mlp, mlp_spec
from torch import nn

from rebasin_callbacks.align import align
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec


def _mlp(seed: int = 0) -> nn.Sequential:
    return mlp([3, 8, 8, 2], seed=seed)


_spec = mlp_spec


def _planted(model: nn.Module, spec: PermutationSpec, seed: int = 0) -> nn.Module:
    return permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(seed)))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa
    )


# ------------------------------------------------------------------------------------------ wrappers
def test_data_parallel_models_are_unwrapped():
    ref = _mlp(0)
    spec = _spec(ref)
    planted = _planted(ref, spec)
    result = align(nn.DataParallel(planted), nn.DataParallel(ref), spec=spec, progress=False, seed=0)
    assert isinstance(result.model, nn.Sequential)
    assert _same(result.model, ref)


def test_compiled_models_are_unwrapped():
    ref = _mlp(0)
    spec = _spec(ref)
    planted = _planted(ref, spec)
    compiled = torch.compile(planted)  # compilation is lazy: nothing is compiled unless it is called
    result = align(compiled, ref, spec=spec, progress=False, seed=0)
    assert _same(result.model, ref)


# ------------------------------------------------------------------------------------------ inputs
def test_dict_example_inputs_get_a_clear_error():
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(TypeError, match=r"example_inputs is a dict.*\['x'\]"):
        align(a, b, example_inputs={"x": torch.randn(2, 3)}, progress=False)


def test_dict_batches_through_data_work():
    a, b = _mlp(0), _mlp(1)
    batches = [{"x": torch.randn(8, 3), "y": torch.randint(0, 2, (8,))} for _ in range(2)]
    result = align(
        a, b, cost="mid", data=batches, loss_fn=nn.functional.cross_entropy, steps=3, progress=False
    )
    assert result.spec.groups  # traced from the dict batch's inputs
    with pytest.raises(TypeError, match=r"data: a dict batch needs an input key.*'pixels'"):
        align(a, b, cost="mid", data=[{"pixels": torch.randn(8, 3)}], loss_fn=nn.functional.cross_entropy,
              progress=False)  # fmt: skip


def test_a_generator_of_batches_is_cycled_not_called_empty():
    a, b = _mlp(0), _mlp(1)
    spec = _spec(a)

    def batches():
        for _ in range(3):
            yield torch.randn(8, 3), torch.randint(0, 2, (8,))

    result = align(a, b, spec=spec, cost="mid", data=batches(), loss_fn=nn.functional.cross_entropy, steps=8,
                   early_stopping=None, progress=False, seed=0)  # fmt: skip
    assert result.steps == 8  # more steps than the generator had batches: its batches are replayed
    with pytest.raises(ValueError, match="yielded no batches"):
        align(a, b, spec=spec, cost="mid", data=iter([]), loss_fn=nn.functional.cross_entropy, progress=False)


def test_float64_reference_follows_the_float32_model():
    ref = _mlp(0)
    spec = _spec(ref)
    planted = _planted(ref, spec)
    ref64 = copy.deepcopy(ref).double()
    before = copy.deepcopy(ref64)
    result = align(planted, ref64, spec=spec, progress=False, seed=0)
    assert result.model[0].weight.dtype == torch.float32
    assert _same(result.model, ref)
    assert _same(ref64, before)  # the reference itself is not cast


# ------------------------------------------------------------------------------------------ costs
def test_a_cost_returning_a_vector_is_named_before_any_work():
    a, b = _mlp(0), _mlp(1)
    calls = []

    def vector_cost(view, reference, batch):
        calls.append(1)
        return torch.stack([(view.state[k] - v).pow(2).sum() for k, v in reference.state_dict().items()])

    with pytest.raises(TypeError, match=r"must return a scalar Tensor.*shape \(6,\)"):
        align(a, b, spec=_spec(a), cost=vector_cost, progress=False)
    assert len(calls) == 1


def test_a_detached_cost_is_named():
    a, b = _mlp(0), _mlp(1)

    def detached_cost(view, reference, batch):
        return sum((view.state[k] - v).pow(2).sum() for k, v in reference.state_dict().items()).detach()

    with pytest.raises(TypeError, match="no gradient"):
        align(a, b, spec=_spec(a), cost=detached_cost, progress=False)


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": float("inf")}, "tau"),
        ({"tau": 1e-9}, "tau"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 1e9}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"method": "sharp"}, "method"),
    ],
)
def test_absurd_settings_are_refused_even_when_the_warm_start_is_optimal(kwargs, match):
    ref = _mlp(0)
    spec = _spec(ref)
    with pytest.raises(ValueError, match=match):
        align(_planted(ref, spec), ref, spec=spec, progress=False, **kwargs)


def test_huge_weights_name_the_overflow_before_matching():
    a, b = _mlp(0), _mlp(1)
    with torch.no_grad():
        a[0].weight.fill_(1e20)
    with pytest.raises(OverflowError, match=r"model: '0.weight'.*1e\+20.*overflow"):
        align(a, b, spec=_spec(a), progress=False)


# ------------------------------------------------------------------------------------------ devices
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_computation_follows_the_model_and_the_reference_stays_put():
    ref = _mlp(0)
    spec = _spec(ref)
    planted = _planted(ref, spec).cuda()
    result = align(planted, ref, spec=spec, progress=False, seed=0)
    assert result.model[0].weight.device.type == "cuda"
    assert ref[0].weight.device.type == "cpu"  # the reference was copied, never moved
    assert torch.equal(result.model[0].weight.cpu(), ref[0].weight)
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]  # CPU batches go to the model's device
    result = align(planted, ref, spec=spec, cost="mid", data=data, loss_fn=nn.functional.cross_entropy,
                   steps=3, progress=False)  # fmt: skip
    assert result.model[0].weight.device.type == "cuda"
