"""The tracer's table of simple ops, and the public way to extend it.

:func:`~rebasin_callbacks.trace_spec` knows how every common layer and tensor op moves channel
permutations. Ops that need no special handling are entries of one table, each with its reason:

* **elementwise**: the output has the input's shape and commutes with a permutation of any dim
  (activations, dropout in eval mode, casts, softmax along a dim); the output keeps the input's labels.
* **channel-preserving**: the output has the input's shape, and a permutation of the channel dim (``dim``)
  commutes with the op, but other dims are mixed (e.g. a fixed blur or a spatial shift); the channel dim keeps
  its label, the others are fixed.
* **boundary**: no permutation may cross it (anything the tracer should not look into).

Register your own module types (matched with ``isinstance``), functions (matched by identity) or tensor
method names (strings, e.g. ``"my_op"`` for ``x.my_op()``); a registered entry takes precedence over the
tracer's built-in handling. Modules registered as elementwise or channel-preserving must have no parameters
or buffers (a per-channel parameter would have to be permuted with the channel; such a module becomes a
boundary). Every spec is still verified by :func:`~rebasin_callbacks.check_spec`, so a wrong registration
drops groups rather than producing a spec that changes the function.

Example:
    >>> import torch
    >>> from rebasin_callbacks import register_elementwise, trace_spec
    >>> class Swish(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x * torch.sigmoid(x)
    >>> _ = register_elementwise(Swish, "x * sigmoid(x) acts on each element alone")
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), Swish(), torch.nn.Linear(8, 1))
    >>> trace_spec(mlp, torch.randn(4, 2)).axes_to_perm["2.weight"]
    (None, 'P_0')
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TraceRule",
    "register_boundary",
    "register_elementwise",
    "register_channel_preserving",
    "unregister",
    "trace_rules",
    "rule_for_module",
    "rule_for_function",
    "rule_for_method",
]

Kind = Literal["boundary", "elementwise", "channel_preserving"]
Target = type | Callable[..., Any] | str


@dataclass(frozen=True)
class TraceRule:
    """How the tracer treats one module type, function or tensor method, and why."""

    kind: Kind
    reason: str
    dim: int = 1  # the channel dim of a channel-preserving op
    builtin: bool = False


_MODULES: dict[type, TraceRule] = {}
_FUNCTIONS: dict[Any, TraceRule] = {}
_METHODS: dict[str, TraceRule] = {}


def _register(target: Target, rule: TraceRule) -> Target:
    if isinstance(target, str):
        _METHODS[target] = rule
    elif isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"a module rule needs an nn.Module subclass, got {target.__name__}")
        _MODULES[target] = rule
    elif callable(target):
        _FUNCTIONS[target] = rule
    else:
        raise TypeError(
            f"target must be an nn.Module subclass, a function or a method name, got {type(target).__name__}"
        )
    return target


def _reason(reason: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("give a reason for the rule (it is shown in the tracer's warnings)")
    return reason.strip()


def register_boundary(target: Target, reason: str) -> Target:
    """Make ``target`` a boundary: every channel it touches is fixed (its own parameters too).

    Returns ``target``, so it can be used as a decorator factory's result::

        register_boundary(MyBlock, "mixes channels through a learned routing table")
    """
    return _register(target, TraceRule("boundary", _reason(reason)))


def register_elementwise(target: Target, reason: str) -> Target:
    """Make ``target`` elementwise: same output shape, commutes with a permutation of every dim."""
    return _register(target, TraceRule("elementwise", _reason(reason)))


def register_channel_preserving(target: Target, reason: str, *, dim: int = 1) -> Target:
    """Make ``target`` channel-preserving: same output shape, commutes with a permutation of ``dim``
    (default 1, the channel dim of ``(N, C, ...)`` tensors); the other dims are mixed, so they are fixed."""
    if not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    return _register(target, TraceRule("channel_preserving", _reason(reason), dim=dim))


def unregister(target: Target) -> TraceRule | None:
    """Remove the rule for ``target`` (built-in rules included); returns the removed rule."""
    if isinstance(target, str):
        return _METHODS.pop(target, None)
    if isinstance(target, type):
        return _MODULES.pop(target, None)
    return _FUNCTIONS.pop(target, None)


def trace_rules() -> dict[str, TraceRule]:
    """Every rule, keyed by a readable name of its target (``"module nn.ReLU"``, ``"method .relu()"``)."""
    out: dict[str, TraceRule] = {}
    for cls, rule in _MODULES.items():
        out[f"module {cls.__module__}.{cls.__qualname__}"] = rule
    for fn, rule in _FUNCTIONS.items():
        out[f"function {getattr(fn, '__module__', None) or ''}.{getattr(fn, '__name__', repr(fn))}"] = rule
    for name, rule in _METHODS.items():
        out[f"method .{name}()"] = rule
    return out


def rule_for_module(m: nn.Module) -> TraceRule | None:
    """The rule for a module instance: its own class first, then the nearest registered base class."""
    for cls in type(m).__mro__:
        rule = _MODULES.get(cls)
        if rule is not None:
            return rule
    return None


def rule_for_function(fn: Any) -> TraceRule | None:
    try:
        return _FUNCTIONS.get(fn)
    except TypeError:  # an unhashable target
        return None


def rule_for_method(name: str) -> TraceRule | None:
    return _METHODS.get(name)


# ====================================================================================== built-in entries
def _builtin(kind: Kind, reason: str, targets: list[Any]) -> None:
    for t in targets:
        _register(t, TraceRule(kind, reason, builtin=True))


_ACTIVATION = "an activation acts on each element alone"
_builtin("elementwise", _ACTIVATION, [
    torch.relu, torch.relu_, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.sigmoid,
    F.tanh, torch.sigmoid, torch.tanh, F.threshold,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Threshold, "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
])  # fmt: skip
_builtin("elementwise", "a pointwise math function acts on each element alone", [
    torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.sin,
    torch.cos, torch.clamp, torch.clip, torch.nan_to_num, torch.sign, torch.reciprocal, torch.floor,
    torch.ceil, torch.round, operator.neg, operator.pos,
    "exp", "log", "abs", "neg", "sqrt", "rsqrt", "square", "erf", "clamp", "clamp_", "clamp_min", "clamp_max",
    "clip", "reciprocal", "sign", "floor", "ceil", "round", "nan_to_num",
])  # fmt: skip
_builtin("elementwise", "dropout is the identity in eval mode, where the graph is traced", [
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
])  # fmt: skip
_builtin("elementwise", "a copy, cast or fill keeps every element where it is", [
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.clone, nn.Identity,
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type", "type_as",
    "requires_grad_", "zero_", "fill_", "cpu", "cuda",
])  # fmt: skip
_builtin("elementwise", "a softmax or normalisation along a dim commutes with a permutation of any dim", [
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize, nn.Softmax, nn.LogSoftmax,
    nn.Softmax2d, "softmax", "log_softmax",
])  # fmt: skip
