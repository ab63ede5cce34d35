"""Where the Lightning callbacks get their permutation spec: :class:`LazySpec`.

The spec is resolved once, by :func:`~rebasin_callbacks.spec_source.resolve_spec`, from what the user gave
(a spec, a function of the module, a JSON path) or by tracing. Without example inputs the callbacks trace
on the inputs the aligned module really receives in its first forward pass (a forward pre-hook), so a
submodule is traced with its own inputs, not the LightningModule's batch.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> source = LazySpec(None, None)
    >>> source.attach(net)  # records the inputs of the next forward pass
    >>> _ = net(torch.randn(5, 2))
    >>> source.get(net, None).sizes, source.example_inputs[0].shape
    ({'P_0': 8}, torch.Size([2, 2]))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.spec_source import SpecLike, resolve_spec

__all__ = ["LazySpec"]


def _head(value: Any, n: int = 2) -> Any:
    """The first ``n`` rows of every tensor in ``value`` (detached copies): a small tracing example."""
    if isinstance(value, Tensor):
        return value[:n].detach().clone() if value.ndim > 0 else value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_head(v, n) for v in value)
    if isinstance(value, Mapping):
        return {k: _head(v, n) for k, v in value.items()}
    return value


def _has_proxy(value: Any) -> bool:
    if isinstance(value, torch.fx.Proxy):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_proxy(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_proxy(v) for v in value.values())
    return False


class LazySpec:
    """Finds the permutation spec once, through :func:`~rebasin_callbacks.spec_source.resolve_spec`: given
    (a spec, a function of the module, a JSON path), or traced on example inputs. Without
    ``example_inputs`` they are the inputs the aligned module really receives in the first training step
    (a forward pre-hook), so a submodule is traced with its own inputs, not the LightningModule's batch."""

    def __init__(self, source: SpecLike, example_inputs: Any):
        self.source = source  # what was given (or a checkpoint's spec); None = trace
        self.spec: PermutationSpec | None = None  # resolved for the aligned module, sizes bound
        self.example_inputs = example_inputs
        self._hook: Any = None

    def attach(self, target: nn.Module) -> None:
        if self.source is None and self.example_inputs is None and self._hook is None:
            self._hook = target.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = args if args or not kwargs else kwargs
        if _has_proxy(inputs):  # a symbolic trace (e.g. another callback tracing the model): wait for data
            return
        if self.example_inputs is None:
            self.example_inputs = _head(inputs)
        self.detach()

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def ready(self, model: nn.Module, pl_module: Any) -> bool:
        """Whether :meth:`get` can resolve the spec now (without waiting for a training step)."""
        return self.source is not None or self._example(model, pl_module) is not None

    def _example(self, model: nn.Module, pl_module: Any) -> Any:
        if self.example_inputs is None and model is pl_module:
            return pl_module.example_input_array
        return self.example_inputs

    def get(self, model: nn.Module, pl_module: Any) -> PermutationSpec:
        if self.spec is None:
            if not self.ready(model, pl_module):
                raise ValueError(
                    "no permutation spec and no example inputs (no training step ran): pass spec=... or "
                    "example_inputs=..."
                )
            example = self._example(model, pl_module)
            self.spec = resolve_spec(model, self.source, example, purpose="nothing to align")
        return self.spec
