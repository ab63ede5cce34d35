"""Where a permutation spec comes from, resolved in one place: :func:`resolve_spec`.

Every entry point accepts the same sources: a :class:`~rebasin_callbacks.PermutationSpec`, a function
``model -> spec`` (for models that grow heads), a path to a spec's JSON file, or nothing, in which case
the spec is traced from example inputs, the first batch of the data, or inputs the model declares
(:func:`~rebasin_callbacks.utils.infer_example_inputs`, with a warning). The result is always a new spec
with every group's size bound; the caller's spec is never modified.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from rebasin_callbacks.batches import infer_example_inputs, split_batch, to_device
from rebasin_callbacks.devices import module_device, module_dtype
from rebasin_callbacks.spec import PermutationSpec
from rebasin_callbacks.trace import trace_spec

__all__ = ["SpecLike", "resolve_spec"]

#: what may stand for a spec: the spec, a function of the model, a JSON file, or nothing (traced)
SpecLike = PermutationSpec | Callable[[nn.Module], PermutationSpec] | str | os.PathLike | None


def resolve_spec(
    model: nn.Module,
    spec: SpecLike = None,
    example_inputs: Any = None,
    *,
    batch: Any = None,
    purpose: str = "nothing to permute",
) -> PermutationSpec:
    """The spec of ``model`` from any source, validated against it, as a new spec with sizes bound.

    Args:
        model: the module the spec describes.
        spec: a spec, a function ``model -> spec``, a path to a JSON spec, or ``None`` to trace one.
        example_inputs: inputs to trace on (moved to the model's device and floating-point dtype).
        batch: a batch of the data, whose inputs are traced on when ``example_inputs`` is not given.
        purpose: the end of the error raised for a spec without groups (says what cannot be done).

    Raises:
        ValueError: no spec and no inputs to trace on; a spec without permutation groups.
        TypeError: a spec function that returns something else than a spec.
        SpecMismatchError: a spec that does not fit ``model`` (the first offending key and axis named).

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> resolve_spec(mlp, example_inputs=torch.randn(4, 2)).sizes
        {'P_0': 8}
    """
    name = type(model).__name__
    if isinstance(spec, (str, os.PathLike)):
        spec = PermutationSpec.from_json(os.fspath(spec))
    elif spec is not None and not isinstance(spec, PermutationSpec):
        if not callable(spec):
            raise TypeError(
                f"spec must be a PermutationSpec, a function model -> spec, a path or None, got {type(spec).__name__}"
            )
        spec = spec(model)
        if not isinstance(spec, PermutationSpec):
            raise TypeError(f"the spec function returned {type(spec).__name__}, not a PermutationSpec")
    if spec is None:
        spec = trace_spec(model, _inputs_to_trace(model, example_inputs, batch))
    bound = spec.with_sizes(model.state_dict(), name=name)
    if len(bound) == 0:
        raise ValueError(f"the permutation spec of {name} has no permutation groups: {purpose}")
    return bound


def _inputs_to_trace(model: nn.Module, example_inputs: Any, batch: Any) -> Any:
    if example_inputs is None and batch is not None:
        example_inputs = split_batch(batch)[0]
    if example_inputs is None:
        inferred = infer_example_inputs(model)
        if inferred is None:
            raise ValueError(
                f"no spec for {type(model).__name__}: pass spec=PermutationSpec(...) or example_inputs=... "
                "to trace one"
            )
        example_inputs, source = inferred
        warnings.warn(
            f"no spec or example inputs for {type(model).__name__}: tracing on random inputs of shape "
            f"{tuple(example_inputs.shape)} from {source}; pass example_inputs= to choose",
            stacklevel=4,
        )
    # the inputs follow the model (it may have moved or changed dtype since they were given)
    return to_device(example_inputs, module_device(model), module_dtype(model))
