"""rng.preserved_rng: every random state a training run draws from is put back, also after an error."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rebasin_callbacks.rng import loader_generators, preserved_rng


def _draws(loader: DataLoader) -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        float(torch.rand(())),
        [int(b) for b in next(iter(loader))],
    )


def _loader() -> DataLoader:
    return DataLoader(range(8), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fail", [False, True])
def test_the_run_draws_what_it_would_have_drawn(fail):
    control = _loader()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = _draws(control)

    loader = _loader()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        with preserved_rng([loader]):
            for _ in range(3):
                _draws(loader)  # consumes every kind of state, the loader's shuffling included
            if fail:
                raise RuntimeError("interrupted")
    assert _draws(loader) == expected


def test_loader_generators_are_found_once():
    gen = torch.Generator()
    loader = DataLoader(range(4), shuffle=True, generator=gen)
    assert loader_generators(loader) == [gen]
    assert loader_generators(object()) == []
