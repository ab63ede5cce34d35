"""Train / eval mode inside a block, every submodule's own flag restored after (:func:`eval_mode`,
:func:`train_mode`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "train_mode"]


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    modes = {m: m.training for m in module.modules()}
    try:
        module.train(training)
        yield module
    finally:
        for m, mode in modes.items():  # each submodule its own flag, even after an exception
            m.training = mode


def eval_mode(module: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: ``module`` in eval mode inside, every submodule's own train flag restored after.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> net[1].eval()  # a mixed state is restored as it was
        Dropout(p=0.5, inplace=False)
        >>> with eval_mode(net):
        ...     net[0].training
        False
        >>> net[0].training, net[1].training
        (True, False)
    """
    return _mode(module, False)


def train_mode(module: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Context manager: ``module`` in train mode inside, every submodule's own train flag restored after.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2).eval()
        >>> with train_mode(net):
        ...     net.training
        True
        >>> net.training
        False
    """
    return _mode(module, True)
