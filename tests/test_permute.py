"""permute(): exact permutations of parameters, buffers and optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rebasin_callbacks.permute import identity_permutations, invert_permutation, permute, random_permutations
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.trace import trace_spec


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class FactoredSGD(torch.optim.Optimizer):
    """Adafactor-like: per 2-D parameter a row vector ``(out,)`` and a column vector ``(in,)`` of squared
    gradient means, and a scalar step; other parameters keep a full second moment."""

    def __init__(self, params, lr: float = 0.1, beta: float = 0.9):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st, g2, b = self.state[p], p.grad.pow(2) + 1e-12, group["beta"]
                st["step"] = st.get("step", torch.tensor(0.0)) + 1
                if p.ndim == 2:
                    st["row"] = b * st.get("row", torch.zeros_like(g2[:, 0])) + (1 - b) * g2.mean(1)
                    st["col"] = b * st.get("col", torch.zeros_like(g2[0])) + (1 - b) * g2.mean(0)
                    v = st["row"][:, None] * st["col"][None, :] / st["row"].mean()
                else:
                    st["v"] = b * st.get("v", torch.zeros_like(g2)) + (1 - b) * g2
                    v = st["v"]
                p.sub_(group["lr"] * p.grad / v.sqrt())


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        pytest.param(
            lambda p: torch.optim.Adafactor(
                p, lr=1e-2, eps=(1e-6, 1e-3)
            ),  # eps: 0.bias has only round-off gradients (BN follows)
            marks=pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch without Adafactor"),
        ),
        lambda p: FactoredSGD(p, lr=0.1),
    ],
    ids=["adam", "adamw-amsgrad", "sgd-momentum", "adafactor", "factored-vectors"],
)
def test_inplace_permutation_with_optimizer_follows_the_mapped_trajectory(make_opt):
    x, y = _data()
    a = _mlp()
    spec = trace_spec(a, x)
    b = _mlp()  # the same initial weights
    opt_a, opt_b = make_opt(a.parameters()), make_opt(b.parameters())
    for _ in range(3):  # build up moments / momentum
        _step(a, opt_a, x, y)
        _step(b, opt_b, x, y)
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    params_before = [id(p) for p in b.parameters()]
    out = permute(b, spec, perms, optimizer=opt_b, inplace=True)
    assert out is b and [id(p) for p in b.parameters()] == params_before  # the optimizer still holds them
    for _ in range(4):
        _step(a, opt_a, x, y)
        _step(b, opt_b, x, y)
    expected = permute(a.state_dict(), spec, perms)
    for key, value in b.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-9, atol=1e-10, msg=key)


def test_optimizer_state_is_what_diverges_without_it():
    # The same experiment without permuting the optimizer state must NOT follow the trajectory
    # (otherwise the test above could not fail).
    x, y = _data()
    a, b = _mlp(), _mlp()
    spec = trace_spec(a, x)
    opt_a, opt_b = torch.optim.Adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(3):
        _step(a, opt_a, x, y)
        _step(b, opt_b, x, y)
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    permute(b, spec, perms, inplace=True)
    _step(a, opt_a, x, y)
    _step(b, opt_b, x, y)
    expected = permute(a.state_dict(), spec, perms)
    assert not torch.allclose(b.state_dict()["0.weight"], expected["0.weight"], atol=1e-6)


def test_state_dict_input_returns_a_new_dict_and_leaves_the_input():
    model = _mlp()
    x, _ = _data()
    spec = trace_spec(model, x)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    perms = random_permutations(spec, torch.Generator().manual_seed(0))
    out = permute(state, spec, perms)
    assert isinstance(out, dict) and out is not state
    for k in state:
        assert torch.equal(state[k], before[k])
    g = spec.axes_to_perm["0.weight"][0]
    assert torch.equal(out["0.weight"], before["0.weight"][perms[g]])
    assert torch.equal(out["1.running_mean"], before["1.running_mean"][perms[g]])
    # the inverse permutation brings everything back
    back = permute(out, spec, {k: invert_permutation(p) for k, p in perms.items()})
    for k in state:
        assert torch.equal(back[k], before[k])


def test_not_inplace_returns_a_copy_and_identity_is_a_no_op():
    model = _mlp()
    spec = trace_spec(model, _data()[0])
    copy = permute(model, spec, identity_permutations(spec))
    assert copy is not model
    for (k, v), w in zip(model.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="inplace=True"):
        permute(model, spec, identity_permutations(spec), optimizer=torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(ValueError, match="inplace=True needs an nn.Module"):
        permute(model.state_dict(), spec, identity_permutations(spec), inplace=True)


@pytest.mark.parametrize(
    ("make_perm", "error", "match"),
    [
        (lambda n: torch.arange(n + 1), SpecMismatchError, "expected"),
        (lambda n: torch.zeros(n, dtype=torch.long), ValueError, "not a permutation"),
        (lambda n: torch.arange(n).float(), TypeError, "integer"),
        (lambda n: torch.arange(n).reshape(1, n), SpecMismatchError, "shape"),
    ],
    ids=["wrong-size", "repeated", "float", "2d"],
)
def test_bad_perms_are_rejected(make_perm, error, match):
    model = _mlp()
    spec = trace_spec(model, _data()[0])
    g = spec.groups[0]
    with pytest.raises(error, match=match):
        permute(model, spec, {g: make_perm(spec.sizes[g])})


def test_unknown_group_and_mismatched_spec_are_rejected():
    model = _mlp()
    spec = trace_spec(model, _data()[0])
    with pytest.raises(SpecMismatchError, match="nope"):
        permute(model, spec, {"nope": torch.arange(3)})
    other = PermutationSpec.from_axes({"missing.weight": ("P", None)}, {"missing.weight": (8, 4)})
    with pytest.raises(SpecMismatchError, match="missing.weight"):
        permute(model, other, {"P": torch.arange(8)})
