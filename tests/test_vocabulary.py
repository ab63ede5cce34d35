"""One name per concept in the public API; the pre-release names are refused."""

import pytest
import torch
from _align_models import mlp, mlp_spec

from rebasin_callbacks import ReBasin, align, random_permutations, trace_spec, weight_matching
from rebasin_callbacks.costs import RndCost
from rebasin_callbacks.incremental import ReBasinIncremental
from rebasin_callbacks.utils import as_generator


def test_seed_takes_an_int_or_a_generator_everywhere():
    spec = mlp_spec(mlp([4, 8, 3], seed=0))
    by_int = random_permutations(spec, seed=3)
    by_gen = random_permutations(spec, seed=torch.Generator().manual_seed(3))
    assert all(torch.equal(by_int[g], by_gen[g]) for g in by_int)
    with pytest.raises(TypeError, match="seed must be an int"):
        as_generator("3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "old"),
    [
        (lambda m, s: ReBasin(m, s, noise=0.2), "noise"),
        (lambda m, s: ReBasin(m, s, generator=torch.Generator().manual_seed(0)), "generator"),
        (lambda m, s: random_permutations(s, generator=torch.Generator().manual_seed(0)), "generator"),
        (lambda m, s: weight_matching(m, m, s, max_iter=2), "max_iter"),
        (lambda m, s: align(m, m, spec=s, noise=0.05, steps=1, progress=False), "noise"),
        (lambda m, s: trace_spec(m, torch.randn(2, 4), generator=torch.Generator().manual_seed(0)), "generator"),
        (lambda m, s: RndCost(torch.nn.functional.mse_loss, generator=torch.Generator().manual_seed(0)), "generator"),
        (lambda m, s: ReBasinIncremental(m, spec=s, generator=torch.Generator().manual_seed(0)), "generator"),
        (lambda m, s: weight_matching(m, m, s, _checked=True), "_checked"),
    ],
    ids=["ReBasin-noise", "ReBasin-generator", "random_permutations", "weight_matching", "align", "trace_spec",
         "RndCost", "ReBasinIncremental", "weight_matching-_checked"],
)  # fmt: skip
def test_names_never_released_are_refused(call, old):
    """The package was never released: the pre-release keyword names are gone (CHANGELOG.md), and passing
    one is Python's own TypeError naming it, not a silent default."""
    model = mlp([4, 8, 3], seed=0)
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}'"):
        call(model, mlp_spec(model))


def test_lmc_and_monitor_old_data_names_are_refused():
    from rebasin_callbacks.lightning import LMCMonitor
    from rebasin_callbacks.lmc import lmc_curve

    a, b = mlp([4, 8, 3], seed=0), mlp([4, 8, 3], seed=1)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(TypeError, match="unexpected keyword argument 'train_data'"):
        lmc_curve(a, b, batches, n_points=2, reset_bn=True, train_data=batches, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dataloader'"):
        LMCMonitor(b, dataloader="train")
