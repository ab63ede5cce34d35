import pytest
import torch
from _align_models import mlp, small_cnn
from torch import nn

from rebasin_callbacks.costs import CosineCost, L2Cost, MidCost, RndCost, resolve_cost
from rebasin_callbacks.rebasin import PermutedView
from rebasin_callbacks.states import interpolate_state_dict


def _view(model: nn.Module) -> PermutedView:
    return PermutedView(model, model.state_dict())


def test_l2_is_the_mean_squared_parameter_difference():
    a, b = mlp([3, 5, 2], seed=0), mlp([3, 5, 2], seed=1)
    expected = sum(((pa - pb) ** 2).sum() for pa, pb in zip(a.parameters(), b.parameters()))
    expected = expected / sum(p.numel() for p in a.parameters())
    torch.testing.assert_close(L2Cost()(_view(a), b, None), expected)
    assert float(L2Cost()(_view(a), a, None)) == 0.0


def test_l2_has_a_gradient_through_the_view():
    a, b = mlp([3, 5, 2], seed=0), mlp([3, 5, 2], seed=1)
    scale = torch.ones((), requires_grad=True)
    view = PermutedView(a, {k: v * scale for k, v in a.state_dict().items()})
    L2Cost()(view, b, None).backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_cosine_is_zero_for_equal_and_scale_free():
    a, b = mlp([3, 5, 2], seed=0), mlp([3, 5, 2], seed=1)
    assert abs(float(CosineCost()(_view(a), a, None))) < 1e-6
    scaled = PermutedView(a, {k: 3 * v for k, v in a.state_dict().items()})
    torch.testing.assert_close(CosineCost()(scaled, b, None), CosineCost()(_view(a), b, None))
    assert float(CosineCost()(_view(a), b, None)) > 0.1


def test_mid_cost_is_the_loss_of_the_midpoint_model():
    a, b = small_cnn(seed=0), small_cnn(seed=1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mid = small_cnn(seed=2)
    mid.load_state_dict(interpolate_state_dict(a.state_dict(), b.state_dict(), 0.5))
    # with batch_stats=False the interpolated BatchNorm statistics are used (eval mode)
    torch.testing.assert_close(mid[1].running_mean, (a[1].running_mean + b[1].running_mean) / 2)
    expected = nn.functional.cross_entropy(mid(x), y)
    cost = MidCost(nn.functional.cross_entropy, batch_stats=False)
    torch.testing.assert_close(cost(_view(a), b, (x, y)), expected)
    # by default BatchNorm normalises with the batch statistics (what a BatchNorm reset estimates)
    mid.train()
    expected_batch = nn.functional.cross_entropy(mid(x), y)
    torch.testing.assert_close(MidCost(nn.functional.cross_entropy)(_view(a), b, (x, y)), expected_batch)
    assert not torch.allclose(expected, expected_batch)


def test_mid_cost_differentiates_through_batchnorm_in_eval_mode():
    # eval-mode BatchNorm is not differentiable with respect to its running statistics: the cost must
    # not need that, and must leave the reference's buffers and modes alone
    a, b = small_cnn(seed=0), small_cnn(seed=1)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    scale = torch.ones((), requires_grad=True)
    view = PermutedView(a, {k: v * scale if v.is_floating_point() else v for k, v in a.state_dict().items()})
    value = MidCost(nn.functional.cross_entropy)(
        view, b, (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    )
    value.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    assert not any(m.training for m in b.modules())


def test_mid_cost_in_train_mode_leaves_the_reference_statistics_alone():
    a, b = small_cnn(seed=0).train(), small_cnn(seed=1).train()
    before = b[1].running_mean.clone()
    MidCost(nn.functional.cross_entropy)(_view(a), b, (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])))
    assert torch.equal(b[1].running_mean, before)


def test_rnd_cost_lies_between_the_ends_and_repeats_with_a_seed():
    a, b = mlp([2, 6, 1], seed=0), mlp([2, 6, 1], seed=1)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    mse = nn.functional.mse_loss
    values = [float(RndCost(mse, seed=s)(_view(a), b, (x, y))) for s in range(3)]
    again = [float(RndCost(mse, seed=s)(_view(a), b, (x, y))) for s in range(3)]
    assert values == again
    assert len(set(values)) == 3  # a different point of the line for each seed


def test_data_costs_need_a_batch():
    a = mlp([2, 6, 1])
    with pytest.raises(ValueError, match="needs data"):
        MidCost(nn.functional.mse_loss)(_view(a), a, None)
    with pytest.raises(TypeError, match="callable"):
        MidCost("mse")  # type: ignore[arg-type]


def test_resolve_cost():
    assert isinstance(resolve_cost("l2"), L2Cost)
    assert isinstance(resolve_cost("COSINE"), CosineCost)
    assert isinstance(resolve_cost("mid", nn.functional.mse_loss), MidCost)
    custom = lambda view, reference, batch: torch.zeros(())  # noqa: E731
    assert resolve_cost(custom) is custom
    with pytest.raises(ValueError, match="loss_fn"):
        resolve_cost("rnd")
    with pytest.raises(ValueError, match="cost must be one of"):
        resolve_cost("l1")


def test_shape_mismatch_names_the_key():
    a, b = mlp([3, 5, 2]), mlp([3, 6, 2])
    with pytest.raises(ValueError, match=r"'0.weight'"):
        L2Cost()(_view(a), b, None)
