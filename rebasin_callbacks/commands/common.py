"""What the checkpoint subcommands share, in one import; each part lives in its own module:

- :mod:`~rebasin_callbacks.commands.errors`: exit statuses, :class:`CommandError`, :func:`guarded`, :func:`say`
- :mod:`~rebasin_callbacks.commands.arguments`: the shared options and their checks that need no torch
- :mod:`~rebasin_callbacks.commands.paths`: every input and output file, checked before any work
- :mod:`~rebasin_callbacks.commands.devices`: ``--device``
- :mod:`~rebasin_callbacks.commands.architectures`: ``--arch`` built into a model (the model zoo)
- :mod:`~rebasin_callbacks.commands.loading`: checkpoints read into models (strict, dtype kept, finite)
- :mod:`~rebasin_callbacks.commands.shapes`: the input shape and an example batch
- :mod:`~rebasin_callbacks.commands.specs`: ``--spec`` or a traced spec
- :mod:`~rebasin_callbacks.commands.datasets`: ``--data`` batches fitted to the input shape

Example:
    >>> from rebasin_callbacks.commands.common import EXIT_USAGE, build_model
    >>> EXIT_USAGE
    2
"""

from __future__ import annotations

from rebasin_callbacks.commands.architectures import build_model, default_input_shape, infer_arch_options
from rebasin_callbacks.commands.arguments import (
    add_align_arguments,
    add_data_arguments,
    add_model_arguments,
    align_kwargs,
    check_options,
)
from rebasin_callbacks.commands.datasets import fit_to_shape, make_loader
from rebasin_callbacks.commands.devices import resolve_device
from rebasin_callbacks.commands.errors import EXIT_IO, EXIT_MISMATCH, EXIT_USAGE, CommandError, guarded, say
from rebasin_callbacks.commands.loading import load_checkpoint, load_models, read_checkpoint
from rebasin_callbacks.commands.paths import check_inputs, check_outputs
from rebasin_callbacks.commands.shapes import (
    describe_shape,
    example_input,
    input_shape,
    input_shape_and_source,
)
from rebasin_callbacks.commands.specs import load_spec

__all__ = [
    "EXIT_USAGE",
    "EXIT_MISMATCH",
    "EXIT_IO",
    "CommandError",
    "guarded",
    "say",
    "add_model_arguments",
    "add_data_arguments",
    "add_align_arguments",
    "align_kwargs",
    "check_options",
    "check_inputs",
    "check_outputs",
    "build_model",
    "default_input_shape",
    "infer_arch_options",
    "load_models",
    "read_checkpoint",
    "load_checkpoint",
    "input_shape",
    "input_shape_and_source",
    "describe_shape",
    "example_input",
    "resolve_device",
    "load_spec",
    "fit_to_shape",
    "make_loader",
]
