"""One name per concept in the public API; the old names still work for one release, with a FutureWarning."""

import warnings

import pytest
import torch
from _align_models import mlp, mlp_spec

from rebasin_callbacks import ReBasin, align, random_permutations, trace_spec, weight_matching
from rebasin_callbacks.costs import RndCost
from rebasin_callbacks.incremental import ReBasinIncremental
from rebasin_callbacks.utils import as_generator, renamed_arguments


def test_seed_takes_an_int_or_a_generator_everywhere():
    spec = mlp_spec(mlp([4, 8, 3], seed=0))
    by_int = random_permutations(spec, seed=3)
    by_gen = random_permutations(spec, seed=torch.Generator().manual_seed(3))
    assert all(torch.equal(by_int[g], by_gen[g]) for g in by_int)
    with pytest.raises(TypeError, match="seed must be an int"):
        as_generator("3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda m, s: ReBasin(m, s, noise=0.2),
        lambda m, s: ReBasin(m, s, generator=torch.Generator().manual_seed(0)),
        lambda m, s: random_permutations(s, generator=torch.Generator().manual_seed(0)),
        lambda m, s: weight_matching(m, m, s, max_iter=2),
        lambda m, s: align(m, m, spec=s, noise=0.05, steps=1, progress=False),
        lambda m, s: trace_spec(m, torch.randn(2, 4), generator=torch.Generator().manual_seed(0)),
        lambda m, s: RndCost(torch.nn.functional.mse_loss, generator=torch.Generator().manual_seed(0)),
        lambda m, s: ReBasinIncremental(m, spec=s, generator=torch.Generator().manual_seed(0)),
    ],
    ids=["ReBasin-noise", "ReBasin-generator", "random_permutations", "weight_matching", "align", "trace_spec",
         "RndCost", "ReBasinIncremental"],
)  # fmt: skip
def test_old_names_still_work_with_a_future_warning(call):
    model = mlp([4, 8, 3], seed=0)
    with pytest.warns(FutureWarning, match="is deprecated"):
        call(model, mlp_spec(model))


def test_old_and_new_name_together_is_an_error():
    model = mlp([4, 8, 3], seed=0)
    with pytest.raises(TypeError, match="pass init_noise= only"):
        ReBasin(model, mlp_spec(model), noise=0.1, init_noise=0.2)


def test_renamed_arguments_is_silent_for_the_new_name():
    @renamed_arguments(old="new")
    def f(*, new: int = 0) -> int:
        return new

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(new=2) == 2
    with pytest.warns(FutureWarning, match="f: old= is deprecated and will be removed; use new="):
        assert f(old=3) == 3


def test_lmc_and_monitor_old_data_names():
    from rebasin_callbacks.lightning import LMCMonitor
    from rebasin_callbacks.lmc import lmc_curve

    a, b = mlp([4, 8, 3], seed=0), mlp([4, 8, 3], seed=1)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.warns(FutureWarning, match="train_data= is deprecated"):
        lmc_curve(a, b, batches, n_points=2, reset_bn=True, train_data=batches, progress=False)
    with pytest.warns(FutureWarning, match="dataloader= is deprecated"):
        assert LMCMonitor(b, dataloader="train").data == "train"
