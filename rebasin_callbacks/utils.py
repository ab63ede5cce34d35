"""The small helpers, importable from one place. Each lives in a module of its own job:

* :mod:`~rebasin_callbacks.batches`: :func:`to_device`, :func:`split_batch`, :func:`take_batches`,
  :func:`infer_example_inputs`;
* :mod:`~rebasin_callbacks.devices`: :func:`module_device`, :func:`module_dtype`, :func:`follow`,
  :func:`resolve_device`;
* :mod:`~rebasin_callbacks.modes`: :func:`eval_mode`, :func:`train_mode`;
* :mod:`~rebasin_callbacks.states`: :func:`check_compatible`, :func:`check_finite`, :func:`l2_distance`,
  :func:`interpolate_state_dict`, :func:`check_lambda`;
* :mod:`~rebasin_callbacks.threads`: :func:`thread_limit`, :func:`default_threads`;
* :mod:`~rebasin_callbacks.seeds`: :func:`as_generator`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from rebasin_callbacks.utils import eval_mode, module_device, to_device
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    >>> batch = to_device({"x": torch.ones(2, 3)}, module_device(net))
    >>> with eval_mode(net):
    ...     y = net(batch["x"])
    >>> net.training
    True
"""

from __future__ import annotations

from rebasin_callbacks.batches import (
    INPUT_KEYS,
    TARGET_KEYS,
    infer_example_inputs,
    split_batch,
    take_batches,
    to_device,
)
from rebasin_callbacks.devices import follow, module_device, module_dtype, resolve_device
from rebasin_callbacks.modes import eval_mode, train_mode
from rebasin_callbacks.seeds import as_generator
from rebasin_callbacks.spec import SpecMismatchError
from rebasin_callbacks.states import (
    check_compatible,
    check_finite,
    check_lambda,
    interpolate_state_dict,
    l2_distance,
)
from rebasin_callbacks.threads import THREADS_ENV, default_threads, thread_limit

__all__ = [
    "INPUT_KEYS",
    "TARGET_KEYS",
    "THREADS_ENV",
    "to_device",
    "split_batch",
    "take_batches",
    "module_device",
    "module_dtype",
    "follow",
    "resolve_device",
    "eval_mode",
    "train_mode",
    "check_compatible",
    "check_finite",
    "check_lambda",
    "l2_distance",
    "interpolate_state_dict",
    "infer_example_inputs",
    "thread_limit",
    "default_threads",
    "as_generator",
    "SpecMismatchError",
]
