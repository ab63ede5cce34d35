"""A conv's (C, H, W) output flattened into a Linear: the channel permutation moves blocks of H * W inputs."""

import pytest
import torch
from torch import nn

from rebasin_callbacks import PermutationSpec, permute, random_permutations, trace_spec, weight_matching
from rebasin_callbacks.permute import perm_to_matrix, permute_state_dict
from rebasin_callbacks.rebasin import apply_soft_permutations
from rebasin_callbacks.spec import SpecMismatchError


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
    )  # fmt: skip


def test_trace_carries_the_channel_group_through_a_flatten():
    net, x = _net(), torch.randn(2, 3, 4, 4)
    spec = trace_spec(net, x)
    assert len(spec) == 2  # both conv groups survive float64 verification
    assert spec.axes_to_perm["5.weight"] == (None, (("P_2", 16),))
    other = permute(net, spec, random_permutations(spec, seed=1))
    assert not torch.equal(other[5].weight, net[5].weight)
    torch.testing.assert_close(other(x), net(x))
    back = permute(other, spec, weight_matching(other, net, spec))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()))


def test_soft_application_of_a_permutation_matrix_equals_the_hard_one():
    net = _net()
    spec = trace_spec(net, torch.randn(2, 3, 4, 4))
    perms = random_permutations(spec, seed=2)
    state = net.state_dict()
    hard = permute_state_dict(state, spec, perms)
    soft = apply_soft_permutations(state, spec, {g: perm_to_matrix(p) for g, p in perms.items()})
    for key in state:
        torch.testing.assert_close(soft[key], hard[key])


def test_flattened_blocks_in_specs_sizes_and_json():
    state = {"fc.weight": torch.zeros(5, 3 * 4 + 2), "conv.weight": torch.zeros(3, 1, 1, 1)}
    spec = PermutationSpec.from_axes(
        {"fc.weight": (None, (("C", 4), 2)), "conv.weight": ("C", None, None, None)}, state
    )
    assert spec.sizes == {"C": 3} and spec.axis_blocks("fc.weight", 1) == [("C", 0, 12), (None, 12, 14)]
    alone = PermutationSpec.from_axes({"fc.weight": (None, (("C", 4), 2))}, state)  # size inferred from k
    assert alone.sizes == {"C": 3}
    assert PermutationSpec.from_json(spec.to_json()).axes_to_perm == spec.axes_to_perm
    with pytest.raises(SpecMismatchError, match="cannot hold the blocks"):
        PermutationSpec.from_axes({"fc.weight": (None, (("C", 5),))}, state)
    with pytest.raises(TypeError, match="k >= 1"):
        PermutationSpec.from_axes({"fc.weight": (None, (("C", 0),))}, state)
