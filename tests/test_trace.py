"""trace_spec / check_spec: derived specs must permute hidden units and never change what a model computes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks import trace as trace_mod
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.trace import (
    SpecCheckError,
    UntraceableModelError,
    check_compatible,
    check_spec,
    trace_spec,
)


def _randomise_bn(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Give BatchNorm layers non-trivial running statistics (fresh ones are 0 / 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x * 2 + 0.5)
    model.eval()


def _assert_preserved(
    model: nn.Module, spec: PermutationSpec, x: torch.Tensor, seed: int = 1, tol: float = 1e-4
):
    """An independent check: our own random permutations, eval mode, the model's real state."""
    model.eval()
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    moved = sum(int((p != torch.arange(p.numel())).any()) for p in perms.values())
    assert moved > 0, "the permutations should not all be identities"
    permuted = permute(model, spec, perms)
    with torch.no_grad():
        a, b = model(x), permuted(x)
    err = (a - b).abs().max() / a.abs().max()
    assert err < tol, f"relative error {err:.3g}"
    # and the permutation really moved the parameters
    changed = [
        k
        for k, v in permuted.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])
    ]
    assert changed


def _quiet_trace(*args, **kwargs) -> PermutationSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_spec(*args, **kwargs)


# --------------------------------------------------------------------------------------------- MLP
def test_mlp_groups_and_fixed_ends():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain MLP has no boundary: no warning at all
        spec = trace_spec(mlp, x)
    a = spec.axes_to_perm
    assert a["0.weight"] == ("P_0", None)  # the input axis is fixed
    assert a["0.bias"] == ("P_0",)
    assert a["2.weight"] == ("P_2", "P_0")
    assert a["4.weight"] == (None, "P_2")  # the output axis is fixed
    assert a["4.bias"] == (None,)
    assert spec.sizes == {"P_0": 16, "P_2": 12}
    _assert_preserved(mlp, spec, x)


def test_example_inputs_as_dict_and_tuple():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(3, 8), nn.Linear(5, 8), nn.Linear(8, 2)

        def forward(self, x, y, scale: float = 1.0):
            return self.out(torch.relu(self.a(x) + self.b(y)) * scale)

    model = TwoInputs()
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    spec_t = _quiet_trace(model, (x, y))
    spec_d = _quiet_trace(model, {"x": x, "y": y})
    assert spec_t.axes_to_perm == spec_d.axes_to_perm
    assert spec_t.axes_to_perm["b.weight"] == ("P_a", None)  # the sum merges both branches
    assert check_spec(model, spec_t, (x, y)) < 1e-5


# --------------------------------------------------------------------------------------------- CNN + BN
def test_cnn_batchnorm_buffers_are_permuted():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    x = torch.randn(4, 3, 12, 12)
    spec = trace_spec(cnn, x)
    a = spec.axes_to_perm
    for key in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert a[key] == ("P_0",)
    assert a["1.num_batches_tracked"] == ()
    assert a["3.weight"] == ("P_3", "P_0", None, None)
    assert a["8.weight"] == (None, "P_3")  # global pooling then flatten: the channel goes through
    _randomise_bn(cnn, x)
    _assert_preserved(cnn, spec, x)


def test_flatten_of_spatial_map_carries_the_channel_group():
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    )
    x = torch.randn(2, 3, 8, 8)
    spec = _quiet_trace(cnn, x)
    assert spec.axes_to_perm["0.weight"][0] == "P_0"
    assert spec.axes_to_perm["2.weight"][0] == "P_2"  # C*H*W flattened: blocks of H*W follow channel i
    assert spec.axes_to_perm["4.weight"] == (None, (("P_2", 16),))
    _assert_preserved(cnn, spec, x)


class _ChannelsLastFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))  # (H, W, C): channels innermost


def test_flatten_with_channels_innermost_tiles_the_channel_group():
    # (H, W, C) -> H * W * C: H * W consecutive copies of the channels, all moved by one permutation
    net, x = _ChannelsLastFlatten(), torch.randn(2, 3, 6, 6)
    spec = _quiet_trace(net, x)
    assert spec.axes_to_perm["conv.weight"][0] == "P_conv"
    assert spec.axes_to_perm["fc.weight"] == (None, ("P_conv",) * 16)
    _assert_preserved(net, spec, x)
    wrong = dict(spec.axes_to_perm)
    wrong["fc.weight"] = (None, ("P_conv",) * 15 + (6,))  # the last position's channels left in place
    broken = PermutationSpec.from_axes(wrong, net.state_dict(), sizes=spec.sizes)
    with pytest.raises(SpecCheckError):
        check_spec(net, broken, x)


def test_groupnorm_groups_move_whole_and_inside():
    ok = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 5, 5)
    assert _quiet_trace(ok, x).axes_to_perm["1.weight"] == ("P_0",)
    spec = _quiet_trace(grouped, x)
    # statistics per group of 2 channels: a permutation inside each group, and one of the 4 groups
    assert spec.axes_to_perm["1.weight"] == (tuple(f"P_1.g{i}" for i in range(4)),)
    assert spec.block_axes["1.weight"] == ((("P_1.groups", 2),),)
    assert spec.block_axes["3.weight"] == (None, (("P_1.groups", 2),), None, None)
    _assert_preserved(grouped, spec, x)


# --------------------------------------------------------------------------------------------- ResNet
def test_resnet18_eval_outputs_preserved():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    spec = _quiet_trace(model, x)
    # one residual stream per stage plus the inner unit of each of the 8 basic blocks
    assert len(spec) == 4 + 8
    a = spec.axes_to_perm
    stream = a["conv1.weight"][0]
    assert a["bn1.running_mean"] == (stream,)
    assert a["layer1.0.conv2.weight"][0] == stream  # the residual add ties block outputs to the stream
    assert a["layer1.1.bn2.running_var"] == (stream,)
    assert a["layer2.0.downsample.0.weight"][1] == stream
    assert a["fc.weight"] == (None, a["layer4.1.bn2.weight"][0])
    assert spec.coverage(model.state_dict()) > 0.99
    _randomise_bn(model, x)
    _assert_preserved(model, spec, x)


# --------------------------------------------------------------------------------------------- depthwise / SE
def test_depthwise_and_squeeze_excite_timm_mobilenetv3():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    spec = _quiet_trace(model, x)
    a = spec.axes_to_perm
    # depthwise conv: its output channels share the input's permutation
    dw = a["blocks.2.0.conv_dw.weight"]
    assert dw[1] is None and dw[0] == a["blocks.2.0.conv_pw.weight"][0]
    # SE: the gate's output channels are tied to the gated tensor, its hidden units are free
    se = a["blocks.2.0.se.conv_expand.weight"]
    assert se[0] == dw[0] and se[1] is not None and se[1] != dw[0]
    assert a["blocks.2.0.se.conv_reduce.weight"][1] == dw[0]
    assert spec.coverage(model.state_dict()) > 0.9
    _randomise_bn(model, x)
    _assert_preserved(model, spec, x)


def test_grouped_conv_groups_and_units():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1)
    )
    x = torch.randn(2, 3, 6, 6)
    spec = _quiet_trace(model, x)
    a, b = spec.axes_to_perm, spec.block_axes
    # the inputs' order inside a group is shared by both groups; each group's outputs have their own
    shared = a["2.weight"][1]
    assert isinstance(shared, str) and a["0.weight"][0] == (shared, shared)
    assert a["2.weight"][0] == ("P_2.g0", "P_2.g1") and a["4.weight"][1] == ("P_2.g0", "P_2.g1")
    # and the two groups swap as wholes, on both sides of the grouped conv
    assert b["0.weight"][0] == (("P_2.groups", 4),) and b["2.weight"][0] == (("P_2.groups", 3),)
    assert b["4.weight"][1] == (("P_2.groups", 3),)
    _assert_preserved(model, spec, x)


def test_grouped_transposed_conv_is_a_boundary():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)
    )
    with pytest.warns(UserWarning, match="ConvTranspose2d"):
        spec = trace_spec(model, torch.randn(1, 3, 6, 6))
    assert spec.axes_to_perm["2.weight"] == (None, None, None, None)


# --------------------------------------------------------------------------------------------- concat
class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 6)
        self.norm = nn.LayerNorm(10)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1)
        return self.out(self.norm(h))


def test_concat_makes_block_axes():
    model = _Concat()
    x = torch.randn(5, 3)
    spec = trace_spec(model, x)
    assert spec.axes_to_perm["out.weight"] == (None, ("P_a", "P_b"))
    assert spec.axes_to_perm["norm.weight"] == (("P_a", "P_b"),)
    assert spec.sizes == {"P_a": 4, "P_b": 6}
    _assert_preserved(model, spec, x)


def test_concat_with_a_fixed_block():
    class WithInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(3, 4), nn.Linear(7, 2)

        def forward(self, x):
            return self.out(torch.cat([x, torch.relu(self.a(x))], dim=1))

    model = WithInput()
    spec = trace_spec(model, torch.randn(5, 3))
    assert spec.axes_to_perm["out.weight"] == (None, (3, "P_a"))  # the raw input block stays in place
    _assert_preserved(model, spec, torch.randn(5, 3))


def test_small_densenet_concat():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3
    )
    x = torch.randn(2, 3, 32, 32)
    spec = _quiet_trace(model, x)
    assert any(isinstance(e, tuple) for axes in spec.axes_to_perm.values() for e in axes)
    assert spec.coverage(model.state_dict()) > 0.95
    _randomise_bn(model, x)
    _assert_preserved(model, spec, x)


# --------------------------------------------------------------------------------------------- attention
def test_timm_vit_heads_and_residual_stream():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    spec = _quiet_trace(model, x)
    a = spec.axes_to_perm
    stream = a["patch_embed.proj.weight"][0]
    assert a["pos_embed"] == (None, None, stream) and a["cls_token"] == (None, None, stream)
    assert a["blocks.0.norm1.weight"] == (stream,) and a["blocks.1.mlp.fc2.weight"][0] == stream
    qkv = a["blocks.0.attn.qkv.weight"]
    heads = model.blocks[0].attn.num_heads
    assert qkv[1] == stream and len(qkv[0]) == 3 * heads
    assert qkv[0][:heads] == qkv[0][heads : 2 * heads]  # a head's query and key share a permutation
    assert a["blocks.0.attn.proj.weight"] == (stream, qkv[0][2 * heads :])  # value heads feed proj
    assert a["head.weight"] == (None, stream)
    assert spec.coverage(model.state_dict()) > 0.99
    _assert_preserved(model, spec, x)


def test_multihead_attention():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            a, _ = self.attn(h, h, h)
            return self.out(a + h)

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(2, 7, 5)
    spec = trace_spec(model, x)
    a = spec.axes_to_perm
    assert a["attn.in_proj_weight"][1] == "P_inp"
    assert a["attn.in_proj_weight"][0] == tuple(f"P_attn.qk{h}" for h in range(4)) * 2 + tuple(
        f"P_attn.v{h}" for h in range(4)
    )
    assert a["attn.out_proj.weight"] == ("P_inp", tuple(f"P_attn.v{h}" for h in range(4)))
    _assert_preserved(model, spec, x)


# --------------------------------------------------------------------------------------------- boundaries
class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.lin(x)
        return -self.lin(x)


def test_untraceable_submodule_becomes_a_boundary():
    model = nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(), _DataDependent(), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)
    )
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match=r"untraceable submodule 2") as record:
        spec = trace_spec(model, x)
    assert len([w for w in record if "boundar" in str(w.message)]) == 1  # ONE warning
    a = spec.axes_to_perm
    assert a["0.weight"][0] is None and a["2.lin.weight"] == (None, None)  # fixed around the boundary
    assert a["4.weight"] == ("P_4", None)  # the rest is still permuted
    _assert_preserved(model, spec, x)


def test_unknown_function_becomes_a_boundary():
    class Cumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.cumsum(self.a(x), dim=-1))))

    model = Cumsum()
    with pytest.warns(UserWarning, match="cumsum"):
        spec = trace_spec(model, torch.randn(2, 3))
    assert spec.axes_to_perm["a.weight"][0] is None and spec.axes_to_perm["b.weight"][0] == "P_b"


def test_untraceable_model_error_names_the_construct():
    with pytest.raises(UntraceableModelError, match=r"(?s)x.sum\(\) > 0.*PermutationSpec.from_axes"):
        trace_spec(_DataDependent(), torch.randn(2, 8))


def test_tied_weights_share_permutations():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.hidden = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.relu(self.hidden(self.emb(idx))))

    model = Tied()
    idx = torch.randint(0, 10, (3, 4))
    spec = _quiet_trace(model, idx)
    assert spec.axes_to_perm["emb.weight"] == spec.axes_to_perm["head.weight"]
    with torch.no_grad():
        a = model(idx)
        b = permute(model, spec, random_permutations(spec, torch.Generator().manual_seed(0)))(idx)
    assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------------------- check_spec
def test_check_spec_catches_missing_buffers_and_names_the_group():
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    x = torch.randn(2, 3, 9, 9)
    good = trace_spec(cnn, x)
    axes = dict(good.axes_to_perm)
    axes["1.running_mean"] = (None,)  # what tools that forget BatchNorm statistics produce
    bad = PermutationSpec.from_axes(axes, cnn.state_dict())
    with pytest.raises(SpecCheckError, match="P_0") as info:
        check_spec(cnn, bad, x)
    assert set(info.value.failing) == {"P_0"}  # bisected to the culprit; P_3 is fine
    assert check_spec(cnn, good, x) < 1e-5
    assert check_spec(cnn, bad, x, groups=["P_3"]) < 1e-5


def test_trace_spec_drops_groups_a_tracer_bug_would_break(monkeypatch):
    # Simulate a tracer bug: Linear layers forget that their input axis follows the input's space.
    def buggy_linear(self, x, w, b, out):
        lx = self.lab(x)
        if b is not None:
            self.sp.merge(b[0], w[0])
        return tuple(lx[:-1]) + (w[0],)

    monkeypatch.setattr(trace_mod._Walker, "linear", buggy_linear)
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="dropped groups"):
        spec = trace_spec(mlp, x)
    assert "P_0" not in spec.groups
    if len(spec):
        assert check_spec(mlp, spec, x) < 1e-5


def test_check_spec_leaves_the_model_alone():
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    spec = trace_spec(mlp, torch.randn(2, 3))
    assert mlp.training
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(SpecMismatchError, match="not in the spec"):
        check_spec(mlp, spec, torch.randn(2, 3), groups=["nope"])


def test_check_compatible_names_the_first_mismatch():
    a = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    check_compatible(a, nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)))
    with pytest.raises(
        SpecMismatchError, match=r"'0.weight' axis 0 has size 8 in the model but 9 in the reference"
    ):
        check_compatible(a, nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 2)))
    with pytest.raises(SpecMismatchError, match="'3.weight'"):
        check_compatible(nn.Sequential(*a, nn.Linear(2, 2)), a)
    with pytest.raises(SpecMismatchError, match="reference has '3.weight'"):
        check_compatible(a, nn.Sequential(*a, nn.Linear(2, 2)))


def test_bad_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        trace_spec(nn.Linear(2, 2), 3.0)
    with pytest.raises(TypeError, match="nn.Module"):
        trace_spec({"w": torch.zeros(2)}, torch.zeros(1))  # type: ignore[arg-type]


def test_slices_of_whole_concat_blocks_keep_their_groups():
    class SliceBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
            return self.c(h[:, 4:]) + h[:, :4].sum(dim=1, keepdim=True)

    model = SliceBlocks()
    x = torch.randn(6, 3)
    spec = trace_spec(model, x)
    assert spec.axes_to_perm["c.weight"] == (None, "P_b")
    assert spec.axes_to_perm["a.weight"] == ("P_a", None)
    _assert_preserved(model, spec, x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trace_and_check_follow_the_model_device():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).cuda()
    x = torch.randn(2, 3, 9, 9, device="cuda")
    spec = trace_spec(cnn, x)
    assert spec.axes_to_perm["1.running_var"] == ("P_0",)
    assert check_spec(cnn, spec, x) < 1e-4
    _assert_preserved(cnn, spec, x)


# --------------------------------------------------------------------------------------------- attention masks
class _RelPosAttention(nn.Module):
    """Window attention with a head-wise relative-position bias table passed to SDPA as ``attn_mask`` (the
    construct of timm's MaxViT "tf" attention: table -> einsum with fixed lookups -> mask)."""

    def __init__(self, dim: int = 16, heads: int = 4, window: int = 3):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, dim // heads, window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn(heads, 2 * window - 1))
        idx = torch.arange(window)
        lookup = torch.nn.functional.one_hot(idx[:, None] - idx[None, :] + window - 1, 2 * window - 1)
        self.register_buffer("lookup", lookup.float(), persistent=False)

    def forward(self, x):  # x: (B, N=window, C)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = torch.einsum("hv,ijv->hij", self.relative_position_bias_table, self.lookup)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _RelPosBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(5, 16), _RelPosAttention(), nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.attn(h))


def test_attention_mask_head_axis_is_tied_to_the_heads():
    torch.manual_seed(0)
    model = _RelPosBlock().eval()
    x = torch.randn(2, 3, 5)
    spec = _quiet_trace(model, x, check=False)  # the tracer alone must get it right
    # the heads of q/k/v are fixed (split out of the channel dim): so must be the table's head axis
    assert spec.axes_to_perm["attn.relative_position_bias_table"] == (None, None)
    assert spec.axes_to_perm["inp.weight"] == ("P_inp", None)  # the residual stream is still permuted
    with torch.no_grad():
        model.attn.relative_position_bias_table.mul_(50)  # a trained-size table
    assert check_spec(model, spec, x) < 1e-12
    # a spec that permutes the table's heads (what the tracer used to emit) is caught in float64 even at
    # the init scale, where it moved float32 outputs by less than 1e-4
    with torch.no_grad():
        model.attn.relative_position_bias_table.div_(50)
    axes = dict(spec.axes_to_perm)
    axes["attn.relative_position_bias_table"] = ("T", None)
    bad = PermutationSpec.from_axes(axes, model.state_dict())
    with pytest.raises(SpecCheckError) as info:
        check_spec(model, bad, x)
    assert set(info.value.failing) == {"T"}


# --------------------------------------------------------------------------------------------- known modules
class _NestStyleAttention(nn.Module):
    """Looks like timm's attention (``qkv`` / ``proj`` Linears, an int ``num_heads``) but has no ``head_dim``
    and lays its output out channel-major: ``x.permute(0, 2, 3, 4, 1).reshape(B, T, N, C)`` puts channel
    ``c' * H + h`` where the standard layout has ``h * d + c'`` (timm's NesT)."""

    def __init__(self, dim: int = 12, num_heads: int = 3):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, N, C = x.shape
        qkv = self.qkv(x).reshape(B, T, N, 3, self.num_heads, C // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.permute(0, 2, 3, 4, 1).reshape(B, T, N, C))


_NestStyleAttention.__name__ = _NestStyleAttention.__qualname__ = "Attention"
_NestStyleAttention.__module__ = "timm.models.nest_like"  # what the old name-based match looked for


class _NestStyleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(4, 12), _NestStyleAttention(), nn.Linear(12, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.attn(h))


def test_attention_matched_by_behaviour_not_by_name():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _NestStyleBlock().eval()
    x = torch.randn(2, 2, 5, 4)
    with pytest.warns(UserWarning, match="boundaries"):
        spec = trace_spec(model, x)
    assert trace_mod._pattern_of(model.attn) is None
    assert spec.axes_to_perm["inp.weight"] == ("P_inp", None)  # the residual stream is still permuted
    assert spec.check_error is not None and spec.check_error < 1e-12
    _assert_preserved(model, spec, x)


def test_standard_timm_attention_keeps_its_pattern_and_checks_its_attributes():
    timm_attention = pytest.importorskip("timm.layers.attention")
    attn = timm_attention.Attention(16, num_heads=4)
    assert trace_mod._pattern_of(attn) == "timm_attention"
    del attn.head_dim  # an attribute the layout needs is missing: traced op by op instead
    assert trace_mod._pattern_of(attn) is None


@pytest.mark.slow
def test_timm_nest_tiny_traces_without_error():
    timm = pytest.importorskip("timm")
    if "nest_tiny" not in timm.list_models("nest*"):
        pytest.skip("this timm has no nest_tiny")
    torch.manual_seed(0)
    model = timm.create_model("nest_tiny", pretrained=False, num_classes=10, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    spec = _quiet_trace(model, x)
    assert len(spec) > 0
    assert spec.check_error is not None and spec.check_error < 1e-9


# --------------------------------------------------------------------------------------------- public rules
class _Ndtr(nn.Module):
    def forward(self, x):
        return torch.special.ndtr(x)  # an elementwise function the tracer does not know


class _Shift(nn.Module):
    def forward(self, x):
        return torch.flip(x, dims=(2, 3))  # mixes positions, never channels (an op the tracer does not know)


def _hidden_groups(model, x):
    return [g for g in _quiet_trace(model, x).groups]


def test_registered_elementwise_module_and_function_keep_the_group():
    from rebasin_callbacks import register_elementwise, trace_rules
    from rebasin_callbacks.trace_rules import unregister

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), _Ndtr(), nn.Linear(8, 2))
    x = torch.randn(4, 3)
    assert _hidden_groups(model, x) == []  # unknown: a boundary
    try:
        register_elementwise(torch.special.ndtr, "the normal CDF acts on each element alone")
        assert "elementwise" in {r.kind for r in trace_rules().values()}
        spec = _quiet_trace(model, x)
        assert spec.groups == ["P_0"]
        _assert_preserved(model, spec, x)
    finally:
        unregister(torch.special.ndtr)
    try:
        register_elementwise(_Ndtr, "wraps the normal CDF")
        assert _hidden_groups(model, x) == ["P_0"]
    finally:
        unregister(_Ndtr)
    assert _hidden_groups(model, x) == []


def test_registered_channel_preserving_and_boundary_modules():
    from rebasin_callbacks import register_boundary, register_channel_preserving
    from rebasin_callbacks.trace_rules import unregister

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), _Shift(), nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 3, 7, 7)
    assert _hidden_groups(model, x) == []
    try:
        register_channel_preserving(_Shift, "a spatial flip moves positions, not channels")
        spec = _quiet_trace(model, x)
        assert spec.groups == ["P_0"]
        _assert_preserved(model, spec, x)
        register_boundary(nn.ReLU, "pretend it mixes channels")  # a user rule overrides the built-in one
        with pytest.warns(UserWarning, match="pretend it mixes channels"):
            assert trace_spec(model, x).groups == []
    finally:
        unregister(_Shift)
        unregister(nn.ReLU)
        from rebasin_callbacks.trace_rules import TraceRule, _register

        _register(nn.ReLU, TraceRule("elementwise", "an activation acts on each element alone", builtin=True))
    assert _hidden_groups(model, x) == []


def test_registered_elementwise_module_with_parameters_is_a_boundary():
    from rebasin_callbacks import register_elementwise
    from rebasin_callbacks.trace_rules import unregister

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(8))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 8), Scaled(), nn.Linear(8, 2))
    try:
        register_elementwise(Scaled, "wrongly registered: it has a per-channel scale")
        with pytest.warns(UserWarning, match="has parameters"):
            spec = trace_spec(model, torch.randn(4, 3))
        assert spec.groups == []
    finally:
        unregister(Scaled)
    with pytest.raises(ValueError, match="reason"):
        register_elementwise(Scaled, "")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_elementwise(int, "not a module")
