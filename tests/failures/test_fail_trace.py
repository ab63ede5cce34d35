"""Failure modes of spec verification and tracing: bad input fails clearly, nothing passes by accident."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks import PermutationSpec, UntraceableModelError, check_spec, trace_spec


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


def _function_changing_spec(model: nn.Module) -> PermutationSpec:
    return PermutationSpec.from_axes({"0.weight": ("H", None), "0.bias": ("H",)}, model.state_dict())


def test_check_spec_refuses_an_empty_batch():
    model = _mlp()
    bad = _function_changing_spec(model)
    with pytest.raises(ValueError, match=r"example_inputs has shape \(0, 3\)"):
        check_spec(model, bad, torch.zeros(0, 3))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_spec_refuses_non_finite_inputs(value):
    model = _mlp()
    x = torch.randn(4, 3)
    x[1, 2] = value
    with pytest.raises(ValueError, match=r"example_inputs\[1\] of shape \(4, 3\) contains 1 NaN/inf"):
        check_spec(model, _function_changing_spec(model), (torch.randn(4, 3), x))


def test_check_spec_names_the_keyword_input():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x, y):
            return self.a(x) + self.a(y)

    with pytest.raises(ValueError, match=r"example_inputs\['y'\] of shape \(2, 3\)"):
        check_spec(
            Two(), PermutationSpec({}, {}), {"x": torch.randn(2, 3), "y": torch.full((2, 3), float("nan"))}
        )


def test_check_spec_refuses_non_finite_outputs():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="no finite"):
        check_spec(model, _function_changing_spec(model), torch.randn(4, 3))


def test_trace_spec_refuses_bad_inputs_before_tracing():
    with pytest.raises(ValueError, match="no elements"):
        trace_spec(_mlp(), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN/inf"):
        trace_spec(_mlp(), torch.tensor([[0.0, float("nan"), 1.0]]))


def test_trace_spec_names_a_model_that_fails_on_its_example():
    with pytest.raises(ValueError, match=r"fails on example_inputs \(tensor shapes \[\(2, 5\)\]\)"):
        trace_spec(_mlp(), torch.randn(2, 5))


def test_a_crash_inside_a_tracer_rule_becomes_a_boundary(monkeypatch):
    from rebasin_callbacks import trace as trace_mod

    def broken(self, x, w, b, out):
        raise AttributeError("'Linear' object has no attribute 'head_dim'")

    monkeypatch.setattr(trace_mod._Walker, "linear", broken)
    with pytest.warns(UserWarning, match="not understood: AttributeError"):
        spec = trace_spec(_mlp(), torch.randn(4, 3))
    assert len(spec) == 0


def test_untraceable_model_is_the_only_error_for_a_model_fx_cannot_trace():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UntraceableModelError):
            trace_spec(DataDependent(), torch.randn(2, 3))


def test_labels_that_do_not_fit_the_state_dict_drop_every_group(monkeypatch):
    from rebasin_callbacks import trace as trace_mod
    from rebasin_callbacks.spec import SpecMismatchError

    def inconsistent(walker, state):
        raise SpecMismatchError("group 'P_0': axis 0 of '0.weight' has size 8 but a block has size 4")

    monkeypatch.setattr(trace_mod, "_assemble", inconsistent)
    with pytest.warns(UserWarning, match="do not fit the state dict"):
        spec = trace_spec(_mlp(), torch.randn(4, 3))
    assert len(spec) == 0


def test_weight_norm_parametrization_is_named_not_silent() -> None:
    from torch.nn.utils import parametrizations

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net[0] = parametrizations.weight_norm(net[0])
    with pytest.warns(UserWarning, match=r"0 has parametrized weight.*remove_parametrizations"):
        trace_spec(net, torch.randn(2, 4))
