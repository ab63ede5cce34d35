"""In-place permutation is all-or-nothing: an optimizer state entry that cannot be permuted is refused before
the model or the optimizer changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import SpecMismatchError
from rebasin_callbacks.trace import trace_spec


def _trained(width_in: int = 4, hidden: int = 8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 3))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, width_in)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt, trace_spec(model, x)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, before):
    weights, opt_state = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for i, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, opt_state["state"][i][name]), (i, name)


@pytest.mark.parametrize("bad_shape", [(5,), (2, 8, 4), (8, 2)])
def test_an_unexpected_optimizer_state_shape_changes_nothing(bad_shape):
    model, opt, spec = _trained()
    last = model[4].weight  # the last parameter: an eager implementation has permuted the others already
    opt.state[last]["odd"] = torch.randn(bad_shape)
    before = _snapshot(model, opt)
    with pytest.raises(SpecMismatchError, match=r"'odd' of '4.weight'.*nothing was changed"):
        permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(1)), optimizer=opt,
                inplace=True)  # fmt: skip
    _assert_unchanged(model, opt, before)


def test_a_factor_vector_of_a_square_parameter_permuted_two_ways_is_refused():
    model, opt, spec = _trained()
    opt.state[model[2].weight]["row"] = torch.randn(8)  # (8, 8): rows and columns are different groups
    before = _snapshot(model, opt)
    with pytest.raises(SpecMismatchError, match="permuted differently"):
        permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(1)), optimizer=opt,
                inplace=True)  # fmt: skip
    _assert_unchanged(model, opt, before)


def test_a_bad_perm_changes_nothing_either():
    model, opt, spec = _trained()
    perms = random_permutations(spec, torch.Generator().manual_seed(1))
    last = sorted(perms)[-1]
    perms[last] = torch.zeros_like(perms[last])  # not a permutation
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="not a permutation"):
        permute(model, spec, perms, optimizer=opt, inplace=True)
    _assert_unchanged(model, opt, before)
