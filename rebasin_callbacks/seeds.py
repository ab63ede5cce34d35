"""``seed`` arguments: an int or a ``torch.Generator`` (:func:`as_generator`)."""

from __future__ import annotations

import torch

__all__ = ["as_generator"]


def as_generator(seed: int | torch.Generator | None, name: str = "seed") -> torch.Generator | None:
    """The random generator a ``seed`` argument stands for: an int seeds a new CPU generator, a generator is
    used as given (its state advances), ``None`` means torch's global random state.

    Example:
        >>> import torch
        >>> torch.equal(torch.randperm(5, generator=as_generator(3)), torch.randperm(5, generator=as_generator(3)))
        True
    """
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, a torch.Generator or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)
