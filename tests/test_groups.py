"""Grouped convolutions and GroupNorm: a block group moves whole groups of channels, unit groups move
channels inside them; verified in float64, recovered by weight matching, a broken one caught."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks.matching import weight_matching
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import SpecCheckError, check_spec, trace_spec
from rebasin_callbacks.utils import l2_distance


class _Bottleneck(nn.Module):
    """A ResNeXt bottleneck: 1x1, grouped 3x3, 1x1, GroupNorm on the grouped part, a residual add."""

    def __init__(self, width: int = 16, inner: int = 24, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.reduce = nn.Conv2d(width, inner, 1)
        self.bn = nn.BatchNorm2d(inner)
        self.grouped = nn.Conv2d(inner, inner, 3, padding=1, groups=groups)
        self.gn = nn.GroupNorm(groups, inner)
        self.expand = nn.Conv2d(inner, width, 1)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = torch.relu(self.bn(self.reduce(h)))
        y = torch.relu(self.gn(self.grouped(y)))
        h = h + self.expand(y)
        return self.head(h.mean((2, 3)))


def _trace(model: nn.Module, x: torch.Tensor) -> PermutationSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_spec(model, x)


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def test_bottleneck_groups_keep_the_function_and_are_recovered():
    torch.manual_seed(0)
    model, x = _Bottleneck().eval(), torch.randn(2, 3, 8, 8)
    _randomise_bn(model)
    spec = _trace(model, x)
    assert spec.block_groups == {"P_grouped.groups"} and spec.sizes["P_grouped.groups"] == 4
    assert spec.coverage(model.state_dict()) > 0.99  # all but the output layer's bias
    assert spec.check_error is not None and spec.check_error < 1e-12
    perms = random_permutations(spec, 4)
    assert not torch.equal(perms["P_grouped.groups"], torch.arange(4))
    planted = permute(model, spec, perms)
    torch.testing.assert_close(planted(x), model(x), atol=1e-5, rtol=1e-5)
    found = weight_matching(planted, model, spec)
    assert l2_distance(permute(planted, spec, found), model) < 1e-5


def test_a_group_moved_on_one_side_only_is_caught():
    torch.manual_seed(0)
    model, x = _Bottleneck().eval(), torch.randn(2, 3, 8, 8)
    spec = _trace(model, x)
    blocks = {k: v for k, v in spec.block_axes.items() if not k.startswith("reduce.")}  # inputs stay
    blocks = {k: v for k, v in blocks.items() if not k.startswith("bn.")}
    broken = PermutationSpec.from_axes(
        spec.axes_to_perm, model.state_dict(), sizes=spec.sizes, block_axes=blocks
    )
    with pytest.raises(SpecCheckError) as info:
        check_spec(model, broken, x)
    assert "P_grouped.groups" in info.value.failing


@pytest.mark.slow
def test_timm_resnext_is_fully_covered():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnext26ts", num_classes=10).eval()
    spec = _trace(model, torch.randn(2, 3, 32, 32))
    assert len(spec.block_groups) == 8  # one per bottleneck
    assert spec.coverage(model.state_dict()) > 0.99
    assert spec.check_error is not None and spec.check_error < 1e-9
