"""Window attention (Swin): window partition / reverse, per-head relative position bias, PatchMerging."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import SpecCheckError, check_spec, trace_spec
from rebasin_callbacks.utils import l2_distance

timm = pytest.importorskip("timm")


def _swin(img_size: int = 32) -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    # 8x8 tokens, windows of 4: stage 0 has a shifted block (mask); a 24 input pads 6x6 tokens to 8x8
    return SwinTransformer(
        img_size=img_size, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
        num_classes=5,
    ).eval()  # fmt: skip


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[PermutationSpec, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = trace_spec(model, x)
    return spec, [str(w.message) for w in caught]


@pytest.mark.parametrize("img_size", [32, 24])
def test_swin_is_traced_through_windows_and_keeps_the_function(img_size: int) -> None:
    torch.manual_seed(0)
    model, x = _swin(img_size), torch.randn(2, 3, img_size, img_size)
    spec, messages = _trace(model, x)
    assert not messages, messages  # no boundary left, nothing dropped by the float64 check
    assert spec.check_error is not None and spec.check_error < 1e-12
    assert spec.coverage(model.state_dict()) > 0.99  # 0.54 before windows were followed
    h = "P_layers.0.blocks.1.attn.heads"  # the shifted block: its mask is shared by the heads
    assert h in spec.block_groups and spec.sizes[h] == 2
    assert spec.block_axes["layers.0.blocks.1.attn.relative_position_bias_table"] == (None, ((h, 1),))
    assert spec.axes_to_perm["layers.0.blocks.1.attn.relative_position_bias_table"] == (None, None)
    # PatchMerging: 4 tokens concatenated, one shared permutation on the 4 blocks
    c = spec.axes_to_perm["layers.1.downsample.reduction.weight"][1]
    assert isinstance(c, tuple) and len(c) == 4 and len(set(c)) == 1 and c[0] is not None
    for only_heads in (True, False):
        perms = random_permutations(spec, 3)
        if only_heads:
            perms = {g: p for g, p in perms.items() if g in spec.block_groups}
        assert not torch.equal(perms[h], torch.arange(2))
        moved = permute(model, spec, perms)
        assert l2_distance(moved, model) > 0
        torch.testing.assert_close(moved(x), model(x), atol=1e-5, rtol=1e-5)
    assert PermutationSpec.from_json(spec.to_json()) == spec


def test_heads_moved_without_their_bias_columns_are_caught() -> None:
    torch.manual_seed(0)
    model, x = _swin(), torch.randn(2, 3, 32, 32)
    spec, _ = _trace(model, x)
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    wrong = {k: v for k, v in spec.block_axes.items() if k != key}  # heads move, their bias stays
    broken = PermutationSpec.from_axes(
        spec.axes_to_perm, model.state_dict(), sizes=spec.sizes, block_axes=wrong
    )
    with pytest.raises(SpecCheckError) as err:
        check_spec(model, broken, x)
    assert "P_layers.0.blocks.1.attn.heads" in err.value.failing


def test_patch_merging_blocks_with_different_permutations_are_caught() -> None:
    torch.manual_seed(0)
    model, x = _swin(), torch.randn(2, 3, 32, 32)
    spec, _ = _trace(model, x)
    axes = dict(spec.axes_to_perm)
    key = "layers.1.downsample.reduction.weight"
    out, blocks = axes[key]
    axes[key] = (
        out,
        (blocks[0], blocks[1], blocks[2], spec.sizes[blocks[3]]),
    )  # the 4th token's channels left in place
    broken = PermutationSpec.from_axes(axes, model.state_dict(), sizes=spec.sizes, block_axes=spec.block_axes)
    with pytest.raises(SpecCheckError):
        check_spec(model, broken, x)


class _RollPad(nn.Module):
    """Channels last: roll / pad over positions keep the channels; over the channels they do not."""

    def __init__(self, channel_dim_moves: bool) -> None:
        super().__init__()
        self.a, self.b, self.moves = nn.Linear(3, 6), nn.Linear(6, 2), channel_dim_moves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (B, H, W, 6)
        if self.moves:
            h = torch.nn.functional.pad(torch.roll(h, 1, dims=-1), (0, 0, 1, 0))[..., 1:, :]
            return self.b(torch.nn.functional.pad(h, (1, 0))[..., 1:])
        h = torch.nn.functional.pad(torch.roll(h, shifts=(1, 2), dims=(1, 2)), (0, 0, 1, 0, 0, 1))
        return self.b(h)


@pytest.mark.parametrize("moves", [False, True])
def test_roll_and_pad_keep_channels_only_off_the_channel_dim(moves: bool) -> None:
    torch.manual_seed(0)
    model, x = _RollPad(moves).eval(), torch.randn(2, 4, 4, 3)
    spec, messages = _trace(model, x)
    assert spec.groups == ([] if moves else ["P_a"])
    assert bool(messages) == moves  # rolling / padding the channels is a reported boundary
    moved = permute(model, spec, random_permutations(spec, 0))
    torch.testing.assert_close(moved(x), model(x))


def test_weight_matching_recovers_a_planted_swin_permutation() -> None:
    from rebasin_callbacks.matching import weight_matching

    torch.manual_seed(0)
    model, x = _swin(), torch.randn(2, 3, 32, 32)
    spec, _ = _trace(model, x)
    planted = permute(model, spec, random_permutations(spec, 1))  # heads, bias columns, units all moved
    assert l2_distance(planted, model) > 1
    back = permute(planted, spec, weight_matching(planted, model, spec))
    assert l2_distance(back, model) < 1e-6
    torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-5)


def test_soft_application_with_hard_matrices_equals_permute() -> None:
    # the relaxation (ReBasin) moves the bias table's columns with the head matrices, as permute does
    from rebasin_callbacks.permute import perm_to_matrix, permute_state_dict
    from rebasin_callbacks.rebasin import apply_soft_permutations

    torch.manual_seed(0)
    model, x = _swin(), torch.randn(2, 3, 32, 32)
    spec, _ = _trace(model, x)
    perms = random_permutations(spec, 7)
    perms["P_layers.0.blocks.1.attn.heads"] = torch.tensor([1, 0])  # 2 heads: make sure they swap
    state = {k: v.double() for k, v in model.state_dict().items()}
    hard = permute_state_dict(state, spec, perms)
    soft = apply_soft_permutations(
        state, spec, {g: perm_to_matrix(p, torch.float64) for g, p in perms.items()}
    )
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    assert not torch.equal(hard[key], state[key])
    for k in spec.axes_to_perm:
        torch.testing.assert_close(soft[k], hard[k], atol=1e-12, rtol=0)


def _tv_swin(v2: bool = False) -> nn.Module:
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    kwargs = {"block": tv.SwinTransformerBlockV2, "downsample_layer": tv.PatchMergingV2} if v2 else {}
    return tv.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5,
        **kwargs,
    ).eval()  # fmt: skip


def test_torchvision_swin_is_traced_through_its_window_functions() -> None:
    torch.manual_seed(0)
    model, x = _tv_swin(), torch.randn(2, 3, 32, 32)
    spec, messages = _trace(model, x)
    assert not messages, messages
    assert spec.coverage(model.state_dict()) > 0.99  # 0.63 before
    h = "P_features.1.1.attn.heads"
    assert spec.block_axes["features.1.1.attn.relative_position_bias_table"] == (None, ((h, 1),))
    assert spec.axes_to_perm["features.1.1.attn.relative_position_index"] == (None,)
    perms = random_permutations(spec, 0)
    perms[h] = torch.tensor([1, 0])
    torch.testing.assert_close(permute(model, spec, perms)(x), model(x), atol=1e-5, rtol=1e-5)
    wrong = {
        k: v for k, v in spec.block_axes.items() if k != "features.1.1.attn.relative_position_bias_table"
    }
    broken = PermutationSpec.from_axes(
        spec.axes_to_perm, model.state_dict(), sizes=spec.sizes, block_axes=wrong
    )
    with pytest.raises(SpecCheckError) as err:
        check_spec(model, broken, x)
    assert h in err.value.failing


def test_torchvision_swin_v2_attention_stays_a_boundary_never_wrong() -> None:
    torch.manual_seed(0)
    model, x = _tv_swin(v2=True), torch.randn(2, 3, 32, 32)
    spec, messages = _trace(model, x)
    assert any("shifted_window_attention not understood" in m for m in messages)
    assert not any("dropped groups" in m for m in messages)  # nothing wrong had to be removed
    assert not spec.block_groups


def test_align_on_swin_keeps_the_function_and_finds_a_planted_permutation() -> None:
    from rebasin_callbacks import align

    torch.manual_seed(0)
    model, x = _swin(), torch.randn(2, 3, 32, 32)
    spec, _ = _trace(model, x)
    planted = permute(model, spec, random_permutations(spec, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = align(planted, model, spec=spec, steps=5, progress=False, seed=0)
    assert l2_distance(result.model, model) < 1e-5
    torch.testing.assert_close(result.model(x), planted(x), atol=1e-5, rtol=1e-5)
