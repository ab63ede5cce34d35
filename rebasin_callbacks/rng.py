"""Save and restore every random state a training run draws from: :func:`preserved_rng`.

Work done between training steps (an alignment, an evaluation over the training data with its
augmentations) must not shift what the run draws next. The states kept are Python's ``random``, NumPy's
global generator, torch's CPU generator and every initialised CUDA device's, and the generators that given
DataLoaders (their samplers, their batch samplers) shuffle with.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["loader_generators", "preserved_rng"]


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader draws from when iterated (its own, its samplers').

    Example:
        >>> from torch.utils.data import DataLoader
        >>> gen = torch.Generator()
        >>> loader_generators(DataLoader(range(4), shuffle=True, generator=gen)) == [gen]
        True
    """
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def preserved_rng(loaders: Iterable[Any] = ()) -> Iterator[None]:
    """Run the block, then put every global random state and the ``loaders``' own generators back as they
    were (also when the block raises).

    Example:
        >>> import random
        >>> random.seed(0)
        >>> with preserved_rng():
        ...     _ = random.random(), np.random.rand(), torch.rand(1)
        >>> random.random() == random.Random(0).random()
        True
    """
    gens = [g for loader in loaders for g in loader_generators(loader)]
    states = [g.get_state() for g in gens]
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            for g, state in zip(gens, states):
                g.set_state(state)
