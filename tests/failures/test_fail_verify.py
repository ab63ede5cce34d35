"""check_spec and aliased (tied) state-dict entries: the check runs the model as it is tied, and a spec that
moves two aliases of one tensor differently is refused, naming both keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from rebasin_callbacks import PermutationSpec, check_spec, permute, random_permutations
from rebasin_callbacks.verify import SpecCheckError


class TiedLM(nn.Module):
    """Embedding and output projection share one (vocab, dim) weight, as language models do."""

    def __init__(self, vocab: int = 12, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.emb(x))))


def _untied_spec(model: nn.Module) -> PermutationSpec:
    # correct for an untied model (emb's columns and out's columns in two groups); wrong for the tied one
    axes = {
        "emb.weight": (None, "P_emb"),
        "hidden.weight": ("P_h", "P_emb"),
        "hidden.bias": ("P_h",),
        "out.weight": (None, "P_h"),
    }
    return PermutationSpec.from_axes(axes, shapes=model.state_dict())


def _tied_spec(model: nn.Module) -> PermutationSpec:
    axes = {
        "emb.weight": (None, "P"),
        "hidden.weight": ("P", "P"),
        "hidden.bias": ("P",),
        "out.weight": (None, "P"),
    }
    return PermutationSpec.from_axes(axes, shapes=model.state_dict())


def test_spec_moving_tied_keys_differently_is_refused_naming_both():
    torch.manual_seed(0)
    model, x = TiedLM(), torch.randint(0, 12, (4, 5))
    spec = _untied_spec(model)
    # what would happen: the permuted tied model computes something else
    moved = permute(model, spec, random_permutations(spec, seed=0))
    assert not torch.allclose(moved(x), model(x), atol=1e-4)
    with pytest.raises(SpecCheckError, match=r"emb\.weight.*out\.weight|out\.weight.*emb\.weight") as err:
        check_spec(model, spec, x)
    assert err.value.failing  # culprit groups named
    assert model.out.weight is model.emb.weight  # the model is untouched


def test_spec_moving_tied_keys_together_passes():
    torch.manual_seed(0)
    model, x = TiedLM(), torch.randint(0, 12, (4, 5))
    spec = _tied_spec(model)
    assert check_spec(model, spec, x) < 1e-12
    moved = permute(model, spec, random_permutations(spec, seed=0))
    torch.testing.assert_close(moved(x), model(x), rtol=1e-5, atol=1e-6)


class SharedScale(nn.Module):
    """Two layers read one registered buffer (the same tensor under two keys)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 2)
        self.a.register_buffer("scale", torch.rand(6) + 0.5)
        self.b.register_buffer("scale", self.a.scale)

    def forward(self, x):
        h = torch.relu(self.a(x) * self.a.scale)
        return self.c(torch.relu(self.b(h) * self.b.scale))


def test_shared_buffer_moved_by_two_groups_is_refused():
    model, x = SharedScale(), torch.randn(5, 4)
    axes = {
        "a.weight": ("P1", None),
        "a.bias": ("P1",),
        "a.scale": ("P1",),
        "b.weight": ("P2", "P1"),
        "b.bias": ("P2",),
        "b.scale": ("P2",),  # the same tensor as a.scale: cannot follow both P1 and P2
        "c.weight": (None, "P2"),
    }
    spec = PermutationSpec.from_axes(axes, shapes=model.state_dict())
    with pytest.raises(SpecCheckError, match=r"a\.scale.*b\.scale"):
        check_spec(model, spec, x)


class _Scale(nn.Module):
    def forward(self, w):
        return 2.0 * w


def test_tied_parametrized_originals_moved_differently_are_refused():
    model, x = TiedLM(), torch.randint(0, 12, (4, 5))
    parametrize.register_parametrization(model.emb, "weight", _Scale())
    model.out.parametrizations = model.emb.parametrizations  # both read one parametrized original
    keys = [k for k in model.state_dict() if k.endswith("original")]
    assert len(keys) == 2
    axes = {
        "emb.parametrizations.weight.original": (None, "P_emb"),
        "hidden.weight": ("P_h", "P_emb"),
        "hidden.bias": ("P_h",),
        "out.parametrizations.weight.original": (None, "P_h"),
    }
    spec = PermutationSpec.from_axes(axes, shapes=model.state_dict())
    with pytest.raises(SpecCheckError, match="original"):
        check_spec(model, spec, x)
