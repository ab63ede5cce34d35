"""check_spec: float64 verification that separates round-off from a real change of the function."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rebasin_callbacks import verify
from rebasin_callbacks.permute import permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import check_spec, trace_spec
from rebasin_callbacks.verify import DEFAULT_RTOL, SpecCheckError


def _quiet_trace(*args, **kwargs) -> PermutationSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_spec(*args, **kwargs)


class _LayerScaleMLP(nn.Module):
    """A residual block whose branch is scaled by a layer scale of 1e-6 (timm's init for deep ViTs)."""

    def __init__(self, d: int = 6, h: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.gamma = nn.Parameter(torch.full((d,), 1e-6))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(x + self.gamma * self.fc2(torch.relu(self.fc1(x))))


def _wrong_hidden_bias_spec(model: _LayerScaleMLP) -> PermutationSpec:
    """The hidden group forgets fc1's bias: a real change, but scaled by gamma it is ~1e-7 at init."""
    return PermutationSpec.from_axes(
        {"fc1.weight": ("H", None), "fc1.bias": (None,), "fc2.weight": (None, "H")}, model.state_dict()
    )


def test_float64_check_catches_a_change_float32_rtol_lets_through():
    torch.manual_seed(0)
    model = _LayerScaleMLP()
    x = torch.randn(4, 6)
    bad = _wrong_hidden_bias_spec(model)
    # What the float32 check at rtol 1e-4 saw: the change hides under the layer scale.
    perms = random_permutations(bad, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), permute(model, bad, perms)(x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    with pytest.raises(SpecCheckError) as info:
        check_spec(model, bad, x)
    assert set(info.value.failing) == {"H"}
    assert info.value.dtype == torch.float64 and info.value.rtol == DEFAULT_RTOL[torch.float64]
    assert info.value.error > 1e3 * info.value.rtol  # far above round-off once the layer scale is exercised


def test_correct_spec_passes_near_float64_round_off():
    torch.manual_seed(0)
    model = _LayerScaleMLP()
    x = torch.randn(4, 6)
    spec = _quiet_trace(model, x)
    assert spec.axes_to_perm["fc1.bias"] == ("P_fc1",)
    assert spec.check_error is not None and spec.check_error < 1e-12
    assert check_spec(model, spec, x) < 1e-12


def test_check_runs_on_a_float64_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).half()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 7, 7).half()
    spec = _quiet_trace(model, x.float().half(), check=False)
    err = check_spec(model, spec, x)
    assert err < 1e-12  # half precision model, float64 check: round-off of float64, not of float16
    assert model.training and next(model.parameters()).dtype == torch.float16
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bisection_names_culprits_with_few_checks(monkeypatch):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(5, 5), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(5, 2))
    x = torch.randn(3, 5)
    spec = _quiet_trace(model, x, check=False)
    assert len(spec) == 8
    axes = dict(spec.axes_to_perm)
    axes["6.bias"] = (None,)  # one broken group among eight
    bad = PermutationSpec.from_axes(axes, model.state_dict())
    calls = []
    real = verify._Checker.error

    def counting(self, perms, rtol=float("inf")):
        calls.append(sorted(perms))
        return real(self, perms, rtol)

    monkeypatch.setattr(verify._Checker, "error", counting)
    with pytest.raises(SpecCheckError) as info:
        check_spec(model, bad, x)
    assert set(info.value.failing) == {"P_6"}
    assert len(calls) <= 1 + 2 * 3  # all at once, then two halves per level: not one check per group


def test_only_a_combination_fails_blames_the_whole_set():
    # Two groups that are each fine alone but wrong together: the check must not pass or blame nothing.
    calls = iter([0.0, 0.0])  # each half alone passes
    failing = verify._bisect(["A", "B"], 1.0, lambda subset: next(calls), 1e-9)
    assert failing == {"A": 1.0, "B": 1.0}


def test_outputs_error_never_treats_nan_as_no_difference():
    a = torch.ones(3)
    assert verify._outputs_error(a, torch.tensor([1.0, float("nan"), 1.0])) == float("inf")
    assert verify._outputs_error(a, torch.ones(4)) == float("inf")
    assert verify._outputs_error(a, a) == 0.0


def test_random_inputs_exercise_the_function():
    # On an all-zero example every input-dependent path is silent; the random inputs are not.
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6, bias=False), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Gate()
    zero = torch.zeros(2, 4)
    bad = PermutationSpec.from_axes({"a.weight": ("H", None)}, model.state_dict())  # b's input forgotten
    with pytest.raises(SpecCheckError):
        check_spec(model, bad, zero)
    # the example alone (n_inputs=1) really is blind to it
    assert check_spec(model, bad, zero, n_inputs=1) == 0.0


def test_float32_on_request_uses_the_float32_tolerance():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 3)
    spec = _quiet_trace(model, x)
    assert check_spec(model, spec, x, dtype=torch.float32) < DEFAULT_RTOL[torch.float32]


def test_model_that_cannot_run_in_float64_falls_back_with_a_warning():
    class PlainConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 2)
            self.mix = torch.eye(2)  # a plain attribute, not a buffer: not converted with the model

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))) @ self.mix

    model = PlainConstant()
    x = torch.randn(4, 3)
    spec = _quiet_trace(model, x, check=False)
    with pytest.warns(UserWarning, match="float32"):
        err = check_spec(model, spec, x)
    assert err < DEFAULT_RTOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trace_gives_the_cpu_groups_under_default_tf32():
    torchvision = pytest.importorskip("torchvision")
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
    try:
        for name in ("resnet50", "vgg11", "resnet18"):
            torch.manual_seed(0)
            cpu = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
            x = torch.randn(2, 3, 64, 64)
            gpu = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
            gpu.load_state_dict(cpu.state_dict())
            gpu = gpu.cuda()
            a = _quiet_trace(cpu, x)
            b = _quiet_trace(gpu, x.cuda())
            assert a.groups == b.groups, name
            assert b.check_error is not None and b.check_error < 1e-9
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
            flags[0],
            True,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        ((2, 12, 9, 8), (12, 1, 3, 3), {"padding": 1, "groups": 12}),  # depthwise
        ((2, 12, 9, 8), (24, 1, 3, 3), {"padding": (1, 2), "stride": 2, "groups": 12}),  # multiplier 2
        ((2, 12, 9, 8), (8, 3, 3, 2), {"dilation": (2, 1), "groups": 4}),  # grouped
        ((2, 12, 9, 8), (8, 3, 3, 3), {"padding": "same", "groups": 4}),  # left to PyTorch
        ((2, 6, 11), (6, 1, 3), {"padding": 2, "dilation": 2, "groups": 6}),  # conv1d depthwise
    ],
)
def test_float64_grouped_convolutions_match_pytorch(x_shape, w_shape, kwargs, monkeypatch):
    conv = torch.nn.functional.conv1d if len(x_shape) == 3 else torch.nn.functional.conv2d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64)
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64)
    used = []
    real = verify._grouped_conv
    monkeypatch.setattr(verify, "_grouped_conv", lambda *a, **k: used.append(1) or real(*a, **k))
    with verify._Float64GroupedConvs():
        out = conv(x, w, b, **kwargs)
    assert used, "the float64 grouped convolution was not intercepted"
    ref = conv(x, w, b, **kwargs)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 1e-12


# --------------------------------------------------------------------------------------------- round-off
def _badly_conditioned_efficientnet() -> tuple[nn.Module, torch.Tensor]:
    """timm's tf_efficientnetv2_b0 at 64x64 with BatchNorm statistics and 1-d parameters randomised: its own
    float64 round-off in the check reaches 1e-9 to 3e-8 (measured), above the default tolerance."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnetv2_b0", num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_tolerance_follows_the_models_own_roundoff():
    model, x = _badly_conditioned_efficientnet()
    spec = _quiet_trace(model, x, check=False)
    assert len(spec) == 44
    # the correct spec's error is above the fixed default (which would drop correct groups), and the
    # measured control run (parameters moved by one ulp, no permutation) explains it
    err = check_spec(model, spec, x, seed=5)
    assert DEFAULT_RTOL[torch.float64] < err <= verify.MAX_RTOL[torch.float64]


def test_a_wrong_group_is_still_caught_in_a_badly_conditioned_model():
    model, x = _badly_conditioned_efficientnet()
    spec = _quiet_trace(model, x, check=False)
    axes = dict(spec.axes_to_perm)
    key = "blocks.3.0.bn2.running_mean"
    group = axes[key][0]
    axes[key] = (None,)  # the statistic stays while its channels move
    bad = PermutationSpec.from_axes(axes, model.state_dict())
    with pytest.raises(SpecCheckError) as info:
        check_spec(model, bad, x, seed=5)
    assert group in info.value.failing
    assert info.value.roundoff is not None and info.value.rtol <= verify.MAX_RTOL[torch.float64]
    assert info.value.error >= 1e-7
