"""Small models and hand-written specs shared by the matching / align tests."""

from __future__ import annotations

import torch
from torch import nn

from rebasin_callbacks.spec import PermutationSpec


def mlp(widths: list[int], *, normal_init: bool = False, seed: int = 0) -> nn.Sequential:
    """``Linear -> tanh -> ... -> Linear`` with the given widths (optionally all params N(0, 1))."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers)
    if normal_init:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    return model


def mlp_spec(model: nn.Sequential) -> PermutationSpec:
    """The hand-written spec of :func:`mlp`: one group per hidden layer."""
    linears = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    axes: dict[str, tuple[str | None, ...]] = {}
    for j, i in enumerate(linears):
        out = f"P{j}" if j < len(linears) - 1 else None
        inp = f"P{j - 1}" if j > 0 else None
        axes[f"{i}.weight"] = (out, inp)
        axes[f"{i}.bias"] = (out,)
    return PermutationSpec.from_axes(axes, model.state_dict())


def small_cnn(seed: int = 0) -> nn.Sequential:
    """conv-BN-relu x2, pooling, linear: BatchNorm statistics must move with the channels."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    with torch.no_grad():  # non-trivial running statistics, so a wrong buffer permutation shows
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def cnn_spec(model: nn.Sequential) -> PermutationSpec:
    axes = {
        "0.weight": ("A", None, None, None),
        "0.bias": ("A",),
        "3.weight": ("B", "A", None, None),
        "3.bias": ("B",),
        "8.weight": (None, "B"),
        "8.bias": (None,),
    }
    for i, g in ((1, "A"), (4, "B")):
        for name in ("weight", "bias", "running_mean", "running_var"):
            axes[f"{i}.{name}"] = (g,)
        axes[f"{i}.num_batches_tracked"] = ()
    return PermutationSpec.from_axes(axes, model.state_dict())


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
