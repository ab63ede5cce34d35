"""Derive a :class:`PermutationSpec` from a model's computation graph, and verify any spec.

:func:`trace_spec` traces the model with ``torch.fx``, records every intermediate shape on the example
inputs, then walks the graph once, giving each tensor dimension a *channel-space* label:

* every Linear / Conv output (and every parameter axis) starts a new space;
* ops that act elementwise, reduce, pool or normalise per channel carry spaces through;
* ops that combine tensors (``+``, ``*`` with broadcasting, ``@``, attention) merge the spaces they align
  (union-find); ``torch.cat`` makes a *block* space (the concatenation of its inputs' spaces);
* the model's inputs and outputs are *fixed* (no permutation may act on them), and whatever the tracer does
  not understand (an unknown call, a reshape that splits or merges a channel, a grouped convolution, an
  untraceable submodule) fixes every space it touches: a boundary. All boundaries are reported in ONE
  warning that names the nodes.

Every space that ends up free and touches a parameter or buffer axis becomes a permutation group. The spec is
then verified by :func:`check_spec` (random permutations must not change what the model computes, in eval
mode, with randomised BatchNorm statistics); groups that fail are dropped with a warning, so ``trace_spec``
never returns a spec that changes the function.
"""

from __future__ import annotations

import importlib
import inspect
import math
import operator
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.trace_rules import TraceRule, rule_for_function, rule_for_method, rule_for_module
from rebasin_callbacks.trace_spaces import Blocks, DimLabel, Repeat, Spaces

# the one state-dict check lives in the bottom layer; re-exported here where it has always been importable
from rebasin_callbacks.utils import as_generator, check_compatible
from rebasin_callbacks.verify import SpecCheckError, check_spec, normalize_inputs, validate_inputs

__all__ = ["trace_spec", "check_spec", "check_compatible", "SpecCheckError", "UntraceableModelError"]


class UntraceableModelError(RuntimeError):
    """``torch.fx`` cannot trace the model's own ``forward`` (e.g. data-dependent control flow)."""


# ====================================================================================== tracing
class _Untraceable(Exception):
    def __init__(self, qualname: str, error: BaseException):
        super().__init__(f"{qualname}: {error}")
        self.qualname, self.error = qualname, error


class _Tracer(fx.Tracer):
    """fx tracer that treats known attention modules and user-chosen modules as leaves, and reports the
    innermost submodule whose forward cannot be traced."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...], autowrap: tuple[Callable, ...]):
        super().__init__(autowrap_functions=autowrap)
        self.leaf_names, self.leaf_types = leaf_names, leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if _pattern_of(m) is not None:
            return True
        rule = rule_for_module(m)
        if rule is not None and not rule.builtin:  # a registered module is handled whole, not traced into
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except _Untraceable:
            raise
        except Exception as e:  # noqa: BLE001 - any failure inside a submodule makes it a leaf candidate
            raise _Untraceable(self.path_of_module(m), e) from e


def _concrete_args(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments the caller does not pass are traced with their defaults (so `if mask is None` works)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if i >= len(args) and p.name not in kwargs and p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def _user_frame(error: BaseException) -> str:
    """The innermost traceback line outside torch (where the untraceable construct is)."""
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}(): `{(f.line or '').strip()}`"


def _build_graph(
    model: nn.Module, args: tuple, kwargs: dict, leaf_modules: Iterable[type | str] | None
) -> tuple[fx.GraphModule, list[str]]:
    """Trace ``model``; submodules that cannot be traced become leaves (returned as the second item)."""
    leaf_names = {m for m in (leaf_modules or ()) if isinstance(m, str)}
    leaf_types = tuple(m for m in (leaf_modules or ()) if isinstance(m, type))
    autowrap: tuple[Callable, ...] = ()
    if "timm" in sys.modules:  # timm registers functions that must not be traced through
        try:
            from timm.layers import _fx as timm_fx

            autowrap = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
        except Exception:  # noqa: BLE001 - an older timm without the registry
            autowrap = ()
    concrete = _concrete_args(model, args, kwargs)
    added: list[str] = []
    for _ in range(64):
        tracer = _Tracer(leaf_names, leaf_types, autowrap)
        try:
            graph = tracer.trace(model, concrete_args=concrete or None)
        except _Untraceable as e:
            if e.qualname in leaf_names or not e.qualname:
                raise _untraceable_error(model, e.error) from e.error
            leaf_names.add(e.qualname)
            added.append(f"{e.qualname} ({type(e.error).__name__}: {str(e.error).splitlines()[0][:120]})")
            continue
        except Exception as e:  # noqa: BLE001 - the model's own forward cannot be traced
            raise _untraceable_error(model, e) from e
        return fx.GraphModule(tracer.root, graph, type(model).__name__), added
    raise UntraceableModelError(f"gave up tracing {type(model).__name__}: too many untraceable submodules")


def _untraceable_error(model: nn.Module, error: BaseException) -> UntraceableModelError:
    return UntraceableModelError(
        f"cannot trace {type(model).__name__}.forward with torch.fx: {type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}{_user_frame(error)}. Data-dependent control flow "
        "(an `if` or loop on tensor values) cannot be traced symbolically. Either move the construct into a "
        "submodule and pass it in leaf_modules=[...] (it becomes a boundary), or write the spec by hand: "
        "PermutationSpec.from_axes({'fc1.weight': ('P0', None), 'fc1.bias': ('P0',), 'fc2.weight': (None, 'P0'), "
        "...}, model.state_dict())."
    )


def _structure(value: Any) -> Any:
    """Shapes of the tensors inside a value (torch.Size for a tensor, nested lists/dicts, None otherwise)."""
    if isinstance(value, Tensor):
        return value.shape
    if isinstance(value, (list, tuple)):
        return [_structure(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _structure(v) for k, v in value.items()}
    return None


def _placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """Positional values for the graph's placeholders, from the caller's positional and keyword inputs."""
    values: list[Any] = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        name = str(node.target).lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:  # the default recorded by the tracer
            values.append(node.args[0])
        else:
            values.append(None)
    return values


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = _structure(out)
        return out


# ====================================================================================== op tables
# Elementwise ops, activations, casts and dropout live in the public table of trace_rules.py.
_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
    torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow, torch.where, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.masked_fill, torch.subtract, torch.multiply,
}  # fmt: skip
_BINARY_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "pow", "pow_", "maximum",
    "minimum", "masked_fill", "masked_fill_", "lerp", "addcmul", "addcmul_", "addcdiv", "where", "copy_",
}  # fmt: skip
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
               torch.prod, torch.norm, torch.linalg.vector_norm}  # fmt: skip
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm", "nansum"}
_META_METHODS = {"size", "dim", "numel", "item", "is_floating_point", "is_contiguous", "nelement", "ndimension",
                 "get_device", "element_size"}  # fmt: skip
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.ravel, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
                    "unflatten", "ravel", "squeeze_", "unsqueeze_"}  # fmt: skip
_EXPAND_METHODS = {"expand", "expand_as", "repeat"}  # repeat: only size-1 dims can be repeated safely
_SPATIAL_FUNCS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool2d: 2, F.lp_pool1d: 1,
    torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}  # fmt: skip
_SPATIAL_MODULES: dict[type, int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}  # fmt: skip
# stochastic depth / drop path multiply by a per-sample mask: equivariant along channels
_DROP_PATH_NAMES = {"stochastic_depth", "drop_path"}


def _standard_attention_forwards() -> tuple[Callable, ...]:
    """The ``forward`` functions of timm's standard attention (wherever this timm version defines it)."""
    global _ATTENTION_FORWARDS
    if _ATTENTION_FORWARDS is not None or "timm" not in sys.modules:
        return _ATTENTION_FORWARDS or ()
    found: list[Callable] = []
    for module in ("timm.layers.attention", "timm.models.vision_transformer"):
        try:
            cls = getattr(importlib.import_module(module), "Attention", None)
        except Exception:  # noqa: BLE001 - a timm without that module
            continue
        if isinstance(cls, type) and "forward" in vars(cls):
            found.append(vars(cls)["forward"])
    _ATTENTION_FORWARDS = tuple(found)
    return _ATTENTION_FORWARDS


_ATTENTION_FORWARDS: tuple[Callable, ...] | None = None  # found once timm is imported


def _imported_attr(module: str, path: str) -> Any:
    """``module.path`` (``"Class.forward"``, a function) of an imported package (timm, torchvision), or None."""
    if module.split(".")[0] not in sys.modules:
        return None
    try:
        found: Any = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a timm without that module
        return None
    for part in path.split("."):
        found = vars(found).get(part) if isinstance(found, type) else getattr(found, part, None)
        if found is None:
            return None
    return found


def _window_attention_forwards() -> tuple[Callable, ...]:
    """The ``forward`` of Swin's ``WindowAttention`` (timm): a standard attention whose scores get a
    relative position bias (a table with one column per head) and a shifted-window mask broadcast over
    the heads (``mask.view(1, num_win, 1, N, N)``), so heads may move as units with the table's columns."""
    found = _imported_attr("timm.models.swin_transformer", "WindowAttention.forward")
    return (found,) if callable(found) else ()


# Functions that only rearrange positions (window partition / reverse): they keep the channel dim (the
# value, counted from the end) and never mix channels; timm marks them untraceable, so they are fx leaves.
_POSITION_ONLY_FUNCTIONS: tuple[tuple[str, str, int], ...] = (
    ("timm.models.swin_transformer", "window_reverse", -1),
    ("timm.models.swin_transformer", "window_partition", -1),
)


# torchvision's Swin (v1) as fx-wrapped functions: (module, name) -> the walker's method for it
_WINDOW_FUNCTIONS: tuple[tuple[str, str, str], ...] = (
    ("torchvision.models.swin_transformer", "shifted_window_attention", "tv_window_attention"),
    ("torchvision.models.swin_transformer", "_get_relative_position_bias", "tv_relative_position_bias"),
    ("torchvision.models.swin_transformer", "_patch_merging_pad", "tv_patch_merging"),
)


def _window_function(fn: Any) -> str | None:
    for module, name, method in _WINDOW_FUNCTIONS:
        if fn is not None and _imported_attr(module, name) is fn:
            return method
    return None


def _position_only_dim(fn: Any) -> int | None:
    for module, name, dim in _POSITION_ONLY_FUNCTIONS:
        if fn is not None and _imported_attr(module, name) is fn:
            return dim
    return None


def _is_norm_of(m: Any, size: int) -> bool:
    if isinstance(m, nn.Identity):
        return True
    return isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (size,)


def _window_pattern_of(m: nn.Module) -> str | None:
    forward = getattr(type(m), "forward", None)
    if forward is None or forward not in _window_attention_forwards():
        return None
    qkv, proj, heads = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    table = m._parameters.get("relative_position_bias_table")  # not getattr: fx returns a proxy while tracing
    if not (
        isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0
    ):
        return None
    width, rest = divmod(qkv.out_features, 3)
    if rest or width % heads or proj.in_features != width:
        return None
    if not (isinstance(table, Tensor) and table.ndim == 2 and table.shape[1] == heads):
        return None
    own = {n for n, _ in m.named_parameters()}
    if not own <= {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"}:
        return None  # a parameter this layout does not know about: traced op by op instead
    return "timm_window_attention"


def _pattern_of(m: nn.Module) -> str | None:
    """Attention modules handled as one unit (their per-head reshapes cannot be followed generically).

    Matched by behaviour, not by name: the module's ``forward`` must be timm's standard one (``qkv`` ->
    ``(B, N, 3, heads, head_dim)`` -> attention -> ``(B, N, heads * head_dim)`` -> ``proj``) and every
    attribute that layout reads must exist with consistent sizes. Anything else (e.g. NesT's attention,
    which has no ``head_dim`` and lays its output out channel-major) is traced op by op, where reshapes it
    does not understand become boundaries."""
    forward = getattr(type(m), "forward", None)
    if forward is None or forward not in _standard_attention_forwards():
        return _window_pattern_of(m)
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return None
    if not (isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0):
        return None
    width = heads * head_dim
    if qkv.out_features != 3 * width or proj.in_features != width or getattr(m, "attn_dim", width) != width:
        return None
    if getattr(m, "gate", None) is not None:
        return None
    if not (_is_norm_of(getattr(m, "q_norm", nn.Identity()), head_dim)
            and _is_norm_of(getattr(m, "k_norm", nn.Identity()), head_dim)
            and _is_norm_of(getattr(m, "norm", nn.Identity()), width)):  # fmt: skip
        return None
    return "timm_attention"


# ====================================================================================== the walk
class _Walker:
    """Assigns channel-space labels to every value of the graph and binds parameter axes to them."""

    def __init__(self, gm: fx.GraphModule, shapes: Mapping[fx.Node, Any], state: Mapping[str, Tensor]):
        self.gm, self.shapes = gm, shapes
        self.sp = Spaces()
        self.labels: dict[fx.Node, Any] = {}
        self.bindings: dict[str, list[DimLabel]] = {}
        self.boundaries: list[str] = []
        # head groups: name -> (number of heads, {state key: block-level axis entries})
        self.head_groups: dict[str, tuple[int, dict[str, tuple[Any, ...]]]] = {}
        # channel groups (grouped convolutions, GroupNorm): (name, number of groups, the labels whose
        # blocks of channels they move together); resolved into block groups when the spec is assembled
        self.channel_groups: list[tuple[str, int, list[DimLabel]]] = []
        # relative position bias values -> the table they were read from (torchvision's Swin)
        self.bias_tables: dict[fx.Node, str] = {}
        self.modules = dict(gm.named_modules())
        # tied tensors (one tensor under several names) must get one permutation: bind them to one key
        self.alias: dict[str, str] = {}
        first: dict[tuple[int, tuple[int, ...]], str] = {}
        for key, value in state.items():
            if isinstance(value, Tensor):
                ident = (id(value), tuple(value.shape))
                self.alias[key] = first.setdefault(ident, key)
        self.state = state

    # ------------------------------------------------------------------ helpers
    def lab(self, a: Any) -> Any:
        """The label of an argument (a node, or nested lists of nodes); None for constants."""
        if isinstance(a, fx.Node):
            return self.labels.get(a)
        if isinstance(a, (list, tuple)):
            return [self.lab(x) for x in a]
        if isinstance(a, Mapping):
            return {k: self.lab(v) for k, v in a.items()}
        return None

    def shape(self, a: Any) -> tuple[int, ...] | None:
        s = self.shapes.get(a) if isinstance(a, fx.Node) else None
        return tuple(s) if isinstance(s, torch.Size) else None

    def is_tensor(self, a: Any) -> bool:
        return self.shape(a) is not None

    def param(self, key: str) -> list[DimLabel] | None:
        """The labels bound to a state_dict entry's axes (fresh spaces the first time)."""
        key = self.alias.get(key, key)
        if key not in self.state:
            return None
        if key not in self.bindings:
            base = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
            shape = tuple(self.state[key].shape)
            self.bindings[key] = [
                self.sp.new(n, f"P_{base}" if ax == 0 else f"P_{key}:{ax}") for ax, n in enumerate(shape)
            ]
        return self.bindings[key]

    def bind(self, key: str, axis: int, label: DimLabel) -> DimLabel:
        labels = self.param(key)
        if labels is None:
            self.sp.fix(label)
            return None
        labels[axis] = self.sp.merge(labels[axis], label)
        return labels[axis]

    def fix_param(self, key: str) -> None:
        labels = self.param(key)
        if labels is not None:
            self.sp.fix(labels)

    def none_like(self, structure: Any) -> Any:
        if isinstance(structure, torch.Size):
            return tuple([None] * len(structure))
        if isinstance(structure, list):
            return [self.none_like(s) for s in structure]
        if isinstance(structure, Mapping):
            return {k: self.none_like(v) for k, v in structure.items()}
        return None

    def boundary(self, node: fx.Node, why: str) -> Any:
        """Fix every space the node touches; its outputs are fixed too."""
        touched = [self.lab(a) for a in list(node.args) + list(node.kwargs.values())]
        if node.op == "call_module":
            for key in self._module_keys(str(node.target)):
                self.fix_param(key)
        if any(self._has_space(t) for t in touched) or node.op == "call_module":
            self.boundaries.append(f"{node.name} ({why})")
        self.sp.fix(touched)
        return self.none_like(self.shapes.get(node))

    def cut(self, node: fx.Node, label: Any, why: str) -> None:
        """Fix ``label``; a boundary worth reporting when it carried a free space."""
        if self._has_space(label):
            self.boundaries.append(f"{node.name} ({why})")
        self.sp.fix(label)

    def _has_space(self, label: Any) -> bool:
        if isinstance(label, (list, tuple)):
            return any(self._has_space(x) for x in label)
        if isinstance(label, Mapping):
            return any(self._has_space(x) for x in label.values())
        return self.sp.resolve(label) is not None if isinstance(label, (int, Blocks, Repeat)) else False

    def _module_keys(self, target: str) -> list[str]:
        m = self.modules[target]
        prefix = f"{target}." if target else ""
        names = [prefix + n for n, _ in m.named_parameters()] + [prefix + n for n, _ in m.named_buffers()]
        return [k for k in names if k in self.state]

    # ------------------------------------------------------------------ generic label algebra
    def broadcast(self, node: fx.Node, operands: Sequence[Any]) -> Any:
        out_shape = self.shape(node)
        if out_shape is None:
            return self.none_like(self.shapes.get(node))
        nd = len(out_shape)
        out: list[DimLabel] = []
        for i in range(nd):
            cur: Any = ...
            for a in operands:
                shape = self.shape(a)
                if shape is None:
                    continue
                j = len(shape) - nd + i
                if j < 0 or (shape[j] == 1 and out_shape[i] != 1):
                    continue
                lab = self.labels[a][j]
                cur = lab if cur is ... else self.sp.merge(cur, lab)
            out.append(None if cur is ... else cur)
        return tuple(out)

    def reshape(self, node: fx.Node, x: Any) -> tuple:
        """Dims that map one-to-one keep their label; dims that are split or merged are fixed."""
        labels, in_shape, out_shape = self.lab(x), self.shape(x), self.shape(node)
        if labels is None or in_shape is None or out_shape is None:
            return self.boundary(node, "reshape of a non-tensor")
        out: list[DimLabel] = [None] * len(out_shape)
        ins = [i for i, n in enumerate(in_shape) if n != 1]
        outs = [j for j, n in enumerate(out_shape) if n != 1]
        if math.prod(in_shape) != math.prod(out_shape) or 0 in in_shape:
            self.cut(node, list(labels), "reshape")
            return tuple(out)
        i = j = 0
        while i < len(ins) and j < len(outs):
            gi, gj = [ins[i]], [outs[j]]
            pi, pj = in_shape[ins[i]], out_shape[outs[j]]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj and i < len(ins):
                    gi.append(ins[i])
                    pi *= in_shape[ins[i]]
                    i += 1
                elif j < len(outs):
                    gj.append(outs[j])
                    pj *= out_shape[outs[j]]
                    j += 1
                else:
                    break
            if len(gi) == 1 and len(gj) == 1:
                out[gj[0]] = labels[gi[0]]
            elif len(gj) == 1 and self._flattens_channels([labels[k] for k in gi]):
                # (C, H, W) -> C * H * W with H, W free of channels: channel i owns a block of H * W
                space = self.sp.resolve(labels[gi[0]])
                assert isinstance(space, int)
                out[gj[0]] = Repeat(space, math.prod(in_shape[k] for k in gi[1:]))
            elif len(gj) == 1 and (tiled := self._tiles_channels([labels[k] for k in gi])) is not None:
                # (H, W, C) -> H * W * C with H, W free of channels (Swin's PatchMerging): H * W
                # consecutive copies of the channel blocks, all moved by the same permutation
                out[gj[0]] = Blocks(tiled * math.prod(in_shape[k] for k in gi[:-1]))
            else:
                self.cut(
                    node,
                    [labels[k] for k in gi],
                    f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits or merges a channel dim",
                )
        return tuple(out)

    def _tiles_channels(self, labels: list[DimLabel]) -> tuple[tuple[int | None, int], ...] | None:
        """The blocks of the last merged dim when every dim before it carries no channel (else None)."""
        *rest, last = [self.sp.resolve(lab) for lab in labels]
        if any(lab is not None for lab in rest):
            return None
        if isinstance(last, int):
            return ((last, self.sp.size[last]),)
        return last.parts if isinstance(last, Blocks) else None

    def _flattens_channels(self, labels: list[DimLabel]) -> bool:
        """Whether merged dims are one channel space followed by dims that carry none."""
        first, *rest = [self.sp.resolve(lab) for lab in labels]
        return isinstance(first, int) and all(lab is None for lab in rest)

    def reduce(self, node: fx.Node, x: Any, dims: Any) -> Any:
        labels, in_shape, out_shape = self.labels[x], self.shape(x), self.shape(node)
        if out_shape is None or in_shape is None:
            return self.none_like(self.shapes.get(node))
        nd = len(in_shape)
        if dims is None or dims == ():
            red = set(range(nd))
        else:
            red = {d % nd for d in ((dims,) if isinstance(dims, int) else dims)} if nd else set()
        # reducing over a permuted dim is invariant: nothing to fix
        if list(out_shape) == [1 if k in red else in_shape[k] for k in range(nd)]:
            return tuple(None if k in red else labels[k] for k in range(nd))
        if list(out_shape) == [in_shape[k] for k in range(nd) if k not in red]:
            return tuple(labels[k] for k in range(nd) if k not in red)
        return self.boundary(node, "reduction with unexpected shape")

    def spatial(self, node: fx.Node, x: Any, k: int) -> Any:
        labels = self.labels.get(x) if isinstance(x, fx.Node) else None
        out_shape = self.shape(node)
        if labels is None or out_shape is None or len(out_shape) != len(labels) or len(labels) < k:
            return self.boundary(node, "pooling with unexpected shapes")
        self.cut(
            node, list(labels[-k:]), "pooling over a channel dim"
        )  # pooling mixes positions: those dims cannot be permuted
        return tuple(labels[:-k]) + (None,) * k

    def matmul(self, node: fx.Node, a: Any, b: Any) -> Any:
        la, lb, sa, sb = self.lab(a), self.lab(b), self.shape(a), self.shape(b)
        if la is None or lb is None or sa is None or sb is None or not sa or not sb:
            return self.boundary(node, "matmul with a non-tensor")
        if len(sb) == 1:
            self.sp.merge(la[-1], lb[0])
            return tuple(la[:-1])
        if len(sa) == 1:
            self.sp.merge(la[0], lb[-2])
            return tuple(lb[:-2]) + (lb[-1],)
        self.sp.merge(la[-1], lb[-2])  # the contracted dim: a sum over it is invariant to a shared perm
        out_shape = self.shape(node)
        assert out_shape is not None
        nb = len(out_shape) - 2
        batch: list[DimLabel] = []
        for i in range(nb):
            cur: Any = ...
            for lab, shp in ((la, sa), (lb, sb)):
                j = len(shp) - 2 - nb + i
                if j < 0 or (shp[j] == 1 and out_shape[i] != 1):
                    continue
                cur = lab[j] if cur is ... else self.sp.merge(cur, lab[j])
            batch.append(None if cur is ... else cur)
        return tuple(batch) + (la[-2], lb[-1])

    # ------------------------------------------------------------------ layers (shared by modules and F.*)
    def linear(
        self, x: Any, w: Sequence[DimLabel] | None, b: Sequence[DimLabel] | None, out: DimLabel
    ) -> Any:
        lx = self.lab(x)
        if w is not None:
            self.sp.merge(w[1], lx[-1])
            out = self.sp.merge(w[0], out) if out is not None else w[0]
        if b is not None:
            out = self.sp.merge(b[0], out)
        return tuple(lx[:-1]) + (out,)

    def conv(self, node: fx.Node, x: Any, w: Any, b: Any, groups: int, transposed: bool = False) -> Any:
        """``w`` / ``b``: a state_dict key (module) or a graph value (functional call)."""
        lx, sx = self.lab(x), self.shape(x)
        sw = tuple(self.state[w].shape) if isinstance(w, str) else self.shape(w)
        w = self.param(w) if isinstance(w, str) else self.lab(w)
        b = self.param(b) if isinstance(b, str) else self.lab(b)
        if lx is None or sx is None or sw is None or w is None or len(sx) < 2 or len(sw) != len(sx):
            return self.boundary(node, "convolution on an unexpected input")
        c_in = sx[1]
        self.sp.fix(list(w[2:]))  # kernel positions are not permutable
        if transposed:
            w_in, w_out = w[0], w[1]
        else:
            w_out, w_in = w[0], w[1]
        if groups == 1:
            self.sp.merge(w_in, lx[1])
            out = w_out
        elif not transposed and groups == c_in and sw[0] == c_in and sw[1] == 1:
            # depthwise: output channel c only reads input channel c, so both share one permutation
            self.sp.fix(w_in)
            out = self.sp.merge(w_out, lx[1])
        elif not transposed and c_in % groups == 0 and sw[1] == c_in // groups and sw[0] % groups == 0:
            # groups of channels: output group g reads input group g only. Whole groups may move (the same
            # block permutation on both sides); inside, the inputs' order is shared by every group (the
            # weight's input axis is per position), the outputs' may differ per group
            ci, co = c_in // groups, sw[0] // groups
            name = str(node.target) if node.op == "call_module" else node.name
            shared = self.sp.new(ci, f"P_{name}.in")
            lin = self.sp.merge(lx[1], Blocks(((shared, ci),) * groups))
            self.sp.merge(w_in, shared)
            outs = Blocks(tuple((self.sp.new(co, f"P_{name}.g{i}"), co) for i in range(groups)))
            out = self.sp.merge(w_out, outs)
            if lin is not None and out is not None:
                self.channel_groups.append((f"P_{name}.groups", groups, [lin, out]))
        else:
            self.boundaries.append(f"{node.name} (grouped convolution, groups={groups})")
            self.sp.fix([w_in, w_out, lx[1]])
            out = None
        if b is not None:
            out = self.sp.merge(b[0], out)
        return (lx[0], out) + (None,) * (len(sx) - 2)

    def per_channel(self, x: Any, tensors: Sequence[Sequence[DimLabel] | None], channel_dim: int = 1) -> Any:
        lx = list(self.lab(x))
        for t in tensors:
            if t is not None:
                lx[channel_dim] = self.sp.merge(lx[channel_dim], t[0])
        return tuple(lx)

    def layer_norm(self, x: Any, k: int, tensors: Sequence[Sequence[DimLabel] | None]) -> Any:
        lx = list(self.lab(x))
        for t in tensors:
            if t is not None:
                for i in range(k):
                    lx[len(lx) - k + i] = self.sp.merge(lx[len(lx) - k + i], t[i])
        return tuple(lx)

    def group_norm(
        self, node: fx.Node, x: Any, groups: int, tensors: Sequence[Sequence[DimLabel] | None]
    ) -> Any:
        sx = self.shape(x)
        if sx is None or len(sx) < 2:
            return self.boundary(node, "group norm on an unexpected input")
        if groups in (1, sx[1]):  # statistics over all channels or per channel: any permutation is fine
            return self.per_channel(x, tensors)
        # statistics per group of channels: whole groups may move, and channels inside each group
        size = sx[1] // groups
        name = str(node.target) if node.op == "call_module" else node.name
        lx = list(self.lab(x))
        parts = Blocks(tuple((self.sp.new(size, f"P_{name}.g{i}"), size) for i in range(groups)))
        lx[1] = self.sp.merge(lx[1], parts)
        if lx[1] is None:
            self.boundaries.append(f"{node.name} (GroupNorm with {groups} groups of {size} channels)")
            self.sp.fix([t for t in tensors if t is not None])
            return tuple(lx)
        self.channel_groups.append((f"P_{name}.groups", groups, [lx[1]]))
        for t in tensors:  # per-channel affine parameters follow the channels
            if t is not None:
                lx[1] = self.sp.merge(lx[1], t[0])
        return tuple(lx)

    def sdpa(self, q: Any, k: Any, v: Any, mask: Any) -> Any:
        lq, lk, lv = self.lab(q), self.lab(k), self.lab(v)
        sq, sk, sv = self.shape(q), self.shape(k), self.shape(v)
        assert sq is not None and sk is not None and sv is not None
        self.sp.merge(lq[-1], lk[-1])  # q.k^T sums over the head dim
        self.sp.merge(lk[-2], lv[-2])  # attn @ v sums over the keys
        # the batch / head dims of q, k, v (and of the mask) broadcast together, as for `+`
        operands = [(lq[:-2], sq[:-2]), (lk[:-2], sk[:-2]), (lv[:-2], sv[:-2])]
        if mask is not None and isinstance(mask, fx.Node) and self.is_tensor(mask):
            # The mask is added to the scores (batch..., L, S): its last two dims follow the queries and
            # the keys, every other non-singleton dim is tied to the scores' batch / head dim.
            lm, sm = self.lab(mask), self.shape(mask)
            assert sm is not None
            if len(sm) > len(sq):
                self.sp.fix(lm)  # more dims than the scores: nothing to tie them to safely
            else:
                for label, j in ((lq[-2], -2), (lk[-2], -1)):
                    if len(sm) >= -j and sm[j] != 1:
                        self.sp.merge(label, lm[j])
                operands.append((lm[:-2], sm[:-2]))
        nb = len(sq) - 2
        batch: list[DimLabel] = []
        for i in range(nb):
            cur: Any = ...
            for labels, shape in operands:
                j = len(shape) - nb + i
                if j < 0 or (shape[j] == 1 and sq[i] != 1):
                    continue
                cur = labels[j] if cur is ... else self.sp.merge(cur, labels[j])
            batch.append(None if cur is ... else cur)
        return tuple(batch) + (lq[-2], lv[-1])

    # ------------------------------------------------------------------ attention units
    def heads(self, name: str, num_heads: int, head_dim: int) -> tuple[list[int], list[int]]:
        qk = [self.sp.new(head_dim, f"P_{name}.qk{h}") for h in range(num_heads)]
        v = [self.sp.new(head_dim, f"P_{name}.v{h}") for h in range(num_heads)]
        return qk, v

    def head_group(
        self, name: str, num_heads: int, head_dim: int, axes: Mapping[str, tuple[int, ...]]
    ) -> None:
        """A group permuting whole heads: ``axes[key] = (axis, segments)`` has ``segments`` consecutive blocks
        of ``num_heads * head_dim`` entries (q, k, v) on that axis, each made of one block per head;
        ``(axis, segments, block)`` gives a block length other than ``head_dim`` (1: one entry per head)."""
        if num_heads < 2:
            return
        entries: dict[str, tuple[Any, ...]] = {}
        for key, (axis, segments, *block) in axes.items():
            if key not in self.state or self.alias.get(key, key) != key:
                return  # a tied tensor: one permutation for several names is not followed at this level
            ndim, n = self.state[key].ndim, block[0] if block else head_dim
            entries[key] = tuple(((name, n),) * segments if ax == axis else None for ax in range(ndim))
        self.head_groups[name] = (num_heads, entries)

    def timm_attention(self, node: fx.Node, m: nn.Module) -> Any:
        x = node.args[0] if node.args else node.kwargs.get("x")
        lx, t = self.lab(x), str(node.target)
        num_heads, head_dim = int(m.num_heads), int(m.head_dim)  # type: ignore[arg-type]
        qk, v = self.heads(t, num_heads, head_dim)
        for norm in ("q_norm", "k_norm"):
            for p in ("weight", "bias"):
                labels = self.param(f"{t}.{norm}.{p}")
                if labels is not None:  # one norm shared by all heads: the head perms must agree
                    for s in qk:
                        self.bind(f"{t}.{norm}.{p}", 0, s)
        qkv_out = Blocks(tuple((s, head_dim) for s in qk + qk + v))
        v_blocks = Blocks(tuple((s, head_dim) for s in v))
        self.bind(f"{t}.qkv.weight", 1, lx[-1])
        self.bind(f"{t}.qkv.weight", 0, qkv_out)
        if f"{t}.qkv.bias" in self.state:
            self.bind(f"{t}.qkv.bias", 0, qkv_out)
        for p in ("weight", "bias"):
            if f"{t}.norm.{p}" in self.state:
                self.bind(f"{t}.norm.{p}", 0, v_blocks)
        self.bind(f"{t}.proj.weight", 1, v_blocks)
        out = self.param(f"{t}.proj.weight")[0]  # type: ignore[index]
        if f"{t}.proj.bias" in self.state:
            out = self.bind(f"{t}.proj.bias", 0, out)
        mask = node.args[1] if len(node.args) > 1 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            self.sp.fix(self.lab(mask))
        else:  # a mask may differ per head: heads move only without one
            axes = {f"{t}.qkv.weight": (0, 3), f"{t}.qkv.bias": (0, 3), f"{t}.proj.weight": (1, 1)}
            axes |= {f"{t}.norm.{p}": (0, 1) for p in ("weight", "bias")}
            self.head_group(
                f"P_{t}.heads", num_heads, head_dim, {k: v for k, v in axes.items() if k in self.state}
            )
        return tuple(lx[:-1]) + (out,)

    def window_attention(self, node: fx.Node, m: nn.Module) -> Any:
        """Swin's window attention: a standard attention (qkv -> heads -> proj) plus a relative position
        bias with one column per head and a window mask shared by all heads. Within-head units move like
        timm's ``Attention``; whole heads move with the bias table's columns (the mask needs nothing)."""
        x = node.args[0] if node.args else node.kwargs.get("x")
        lx, t = self.lab(x), str(node.target)
        num_heads = int(m.num_heads)  # type: ignore[arg-type]
        head_dim = int(m.qkv.out_features) // (3 * num_heads)  # type: ignore[union-attr,operator,arg-type]
        qk, v = self.heads(t, num_heads, head_dim)
        qkv_out = Blocks(tuple((s, head_dim) for s in qk + qk + v))
        self.bind(f"{t}.qkv.weight", 1, lx[-1])
        self.bind(f"{t}.qkv.weight", 0, qkv_out)
        if f"{t}.qkv.bias" in self.state:
            self.bind(f"{t}.qkv.bias", 0, qkv_out)
        self.bind(f"{t}.proj.weight", 1, Blocks(tuple((s, head_dim) for s in v)))
        out = self.param(f"{t}.proj.weight")[0]  # type: ignore[index]
        if f"{t}.proj.bias" in self.state:
            out = self.bind(f"{t}.proj.bias", 0, out)
        table = f"{t}.relative_position_bias_table"
        self.fix_param(table)  # its rows are positions; its columns move only with whole heads (below)
        mask = node.args[1] if len(node.args) > 1 else node.kwargs.get("mask")
        self.sp.fix(self.lab(mask))  # (windows, N, N): positions only, broadcast over the heads
        axes: dict[str, tuple[int, ...]] = {f"{t}.qkv.weight": (0, 3), f"{t}.qkv.bias": (0, 3)}
        axes |= {f"{t}.proj.weight": (1, 1), table: (1, 1, 1)}
        self.head_group(
            f"P_{t}.heads", num_heads, head_dim, {k: a for k, a in axes.items() if k in self.state}
        )
        return tuple(lx[:-1]) + (out,)

    def multihead_attention(self, node: fx.Node, m: nn.MultiheadAttention) -> Any:
        t = node.target
        names = ["query", "key", "value"]
        q, k, v = (node.args[i] if len(node.args) > i else node.kwargs.get(names[i]) for i in range(3))
        lq, lk, lv = self.lab(q), self.lab(k), self.lab(v)
        masks = [
            a for a in list(node.args[3:]) + [a for n, a in node.kwargs.items() if n not in names]
            if isinstance(a, fx.Node)
        ]  # fmt: skip
        for other in masks:
            self.sp.fix(self.lab(other))
        for lab in (lq, lk, lv):
            self.cut(node, list(lab[:-1]), "attention over a channel dim")  # sequence and batch positions
        qk, vh = self.heads(str(t), m.num_heads, m.head_dim)
        qk_b = Blocks(tuple((s, m.head_dim) for s in qk))
        v_b = Blocks(tuple((s, m.head_dim) for s in vh))
        if m._qkv_same_embed_dim:
            for lab in (lq, lk, lv):
                self.bind(f"{t}.in_proj_weight", 1, lab[-1])
            self.bind(f"{t}.in_proj_weight", 0, Blocks(qk_b.parts + qk_b.parts + v_b.parts))
        else:
            for p, lab, blocks in (("q", lq, qk_b), ("k", lk, qk_b), ("v", lv, v_b)):
                self.bind(f"{t}.{p}_proj_weight", 1, lab[-1])
                self.bind(f"{t}.{p}_proj_weight", 0, blocks)
        if m.in_proj_bias is not None:
            self.bind(f"{t}.in_proj_bias", 0, Blocks(qk_b.parts + qk_b.parts + v_b.parts))
        if m.bias_k is not None:
            self.bind(f"{t}.bias_k", 2, qk_b)
            self.bind(f"{t}.bias_v", 2, v_b)
        self.bind(f"{t}.out_proj.weight", 1, v_b)
        out = self.param(f"{t}.out_proj.weight")[0]  # type: ignore[index]
        if f"{t}.out_proj.bias" in self.state:
            out = self.bind(f"{t}.out_proj.bias", 0, out)
        structure = self.shapes.get(node)
        weights = self.none_like(structure[1]) if isinstance(structure, list) else None
        returned = isinstance(structure, list) and structure[1] is not None
        per_head = returned and node.kwargs.get("average_attn_weights", True) is False
        if not masks and not per_head:
            # per-head attention weights returned, or a mask that may differ per head: heads stay in place
            axes = {
                f"{t}.in_proj_weight": (0, 3),
                f"{t}.in_proj_bias": (0, 3),
                f"{t}.out_proj.weight": (1, 1),
            }
            axes |= {f"{t}.{p}_proj_weight": (0, 1) for p in "qkv"}
            axes |= {f"{t}.bias_k": (2, 1), f"{t}.bias_v": (2, 1)}
            self.head_group(
                f"P_{t}.heads", m.num_heads, m.head_dim, {k: v for k, v in axes.items() if k in self.state}
            )
        return [(None,) * (len(lq) - 1) + (out,), weights]

    # ------------------------------------------------------------------ dispatch
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                label = self.visit(node)
            except Exception as e:  # noqa: BLE001 - a surprise inside a handler: a boundary, never a crash
                label = self.boundary(node, f"not understood: {type(e).__name__}: {str(e)[:80]}")
            structure = self.shapes.get(node)
            if isinstance(structure, torch.Size) and not self._fits(label, structure):
                # a safety net: a handler produced labels that do not match the recorded shape
                label = self.boundary(node, "unexpected result shape")
            self.labels[node] = label

    def _fits(self, label: Any, shape: torch.Size) -> bool:
        if not isinstance(label, tuple) or len(label) != len(shape):
            return False
        return all(self.sp.label_size(d) in (None, n) for d, n in zip(label, shape))

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.none_like(self.shapes.get(node))  # inputs are fixed
        if node.op == "output":
            self.sp.fix(self.lab(node.args[0]))  # outputs are fixed
            return None
        if node.op == "get_attr":
            structure = self.shapes.get(node)
            labels = self.param(str(node.target)) if isinstance(structure, torch.Size) else None
            return tuple(labels) if labels is not None else self.none_like(structure)
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)])
        if node.op == "call_method":
            return self.visit_method(node, str(node.target))
        return self.visit_function(node, node.target)

    def arg(self, node: fx.Node, i: int, name: str, default: Any = None) -> Any:
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def apply_rule(
        self, node: fx.Node, rule: TraceRule, x: Any, what: str, m: nn.Module | None = None
    ) -> Any:
        """An entry of the public op table (trace_rules.py)."""
        if rule.kind == "boundary":
            return self.boundary(node, f"{what}: {rule.reason}")
        if not self.is_tensor(x) or self.shape(node) != self.shape(x):
            return self.boundary(node, f"{what} registered as {rule.kind} but changes the shape")
        if m is not None and (next(m.parameters(), None) is not None or next(m.buffers(), None) is not None):
            # a per-channel parameter would have to move with the channel: the table cannot say how
            return self.boundary(node, f"{what} registered as {rule.kind} but has parameters")
        if rule.kind == "elementwise":
            # tensor arguments of a function (torch.clamp(x, min=t)) broadcast like `+`; a method's are
            # dtype / device sources (x.type_as(y)) that carry no channel
            others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if self.is_tensor(a)]
            return (
                self.broadcast(node, [x, *others]) if others and node.op == "call_function" else self.lab(x)
            )
        lx = list(self.lab(x))
        d = rule.dim % len(lx) if lx else 0
        self.cut(node, [lab for i, lab in enumerate(lx) if i != d], f"{what} mixes the dims other than {d}")
        self.sp.fix(self.lab([a for a in list(node.args[1:]) + list(node.kwargs.values())]))
        return tuple(lab if i == d else None for i, lab in enumerate(lx))

    def visit_module(self, node: fx.Node, m: nn.Module) -> Any:
        x = self.arg(node, 0, "input")
        rule = rule_for_module(m)
        if rule is not None:
            return self.apply_rule(node, rule, x, f"module {type(m).__name__}", m)
        if not self.is_tensor(x) and not isinstance(m, nn.MultiheadAttention):
            return self.boundary(node, f"module {type(m).__name__} on a non-tensor input")
        pattern = _pattern_of(m)
        if pattern == "timm_attention":
            return self.timm_attention(node, m)
        if pattern == "timm_window_attention":
            return self.window_attention(node, m)
        handler = _module_handler(type(m))
        if handler is not None:
            return handler(self, node, m, x)
        return self.boundary(node, f"module {type(m).__name__} not understood")

    def visit_method(self, node: fx.Node, name: str) -> Any:
        x: Any = node.args[0]
        if not self.is_tensor(x):
            return self.generic(node, f"method .{name}()")
        a: Any = node.args[1:]
        if name in _META_METHODS:
            return self.none_like(self.shapes.get(node))
        rule = rule_for_method(name)
        if rule is not None:
            return self.apply_rule(node, rule, x, f".{name}()")
        if name in _BINARY_METHODS:
            return self.broadcast(
                node, [x] + [v for v in list(a) + list(node.kwargs.values()) if isinstance(v, fx.Node)]
            )
        if name in _REDUCTION_METHODS:
            return self.reduce(node, x, self.arg_dim(node, 2 if name == "norm" else 1))
        if name in _RESHAPE_METHODS:
            return self.reshape(node, x)
        if name in ("permute", "transpose", "movedim", "swapaxes", "swapdims", "t"):
            return self.permute_like(node, name, x, a)
        if name in _EXPAND_METHODS:
            return self.expand(node, x)
        if name in ("chunk", "split", "unbind", "tensor_split", "split_with_sizes"):
            return self.split(node, name, x)
        if name in ("matmul", "bmm", "mm"):
            return self.matmul(node, x, a[0])
        if name in ("softmax", "log_softmax"):
            return self.lab(x)
        if name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
            return self.none_like(self.shapes.get(node))
        if name in ("max", "min") and len(a) == 0 and not node.kwargs:
            return self.reduce(node, x, None)
        return self.generic(node, f"method .{name}()")

    def arg_dim(self, node: fx.Node, i: int) -> Any:
        d = node.args[i] if len(node.args) > i else node.kwargs.get("dim", node.kwargs.get("axis"))
        return tuple(d) if isinstance(d, list) else d

    def permute_like(self, node: fx.Node, name: str, x: Any, a: Any) -> Any:
        lx = list(self.lab(x))
        nd = len(lx)
        if name == "permute":
            dims: Any = a[0] if len(a) == 1 and isinstance(a[0], (list, tuple)) else a
            if not dims:
                dims = node.kwargs.get("dims", ())
            order = [int(d) % nd for d in dims]
            return tuple(lx[d] for d in order)
        if name == "movedim":
            src: Any
            dst: Any
            src, dst = (a[0], a[1]) if len(a) >= 2 else (node.kwargs["source"], node.kwargs["destination"])
            src_l = [int(s) % nd for s in (src if isinstance(src, (list, tuple)) else [src])]
            dst_l = [int(s) % nd for s in (dst if isinstance(dst, (list, tuple)) else [dst])]
            rest = [d for d in range(nd) if d not in src_l]
            out: list[Any] = [None] * nd
            for s, d in zip(src_l, dst_l):
                out[d] = lx[s]
            free = [i for i in range(nd) if i not in dst_l]
            for i, d in zip(free, rest):
                out[i] = lx[d]
            return tuple(out)
        if name == "t" or (name == "transpose" and not a):
            return tuple(reversed(lx))
        d0: Any
        d1: Any
        d0, d1 = (a[0], a[1]) if len(a) >= 2 else (node.kwargs.get("dim0"), node.kwargs.get("dim1"))
        d0, d1 = int(d0) % nd, int(d1) % nd
        lx[d0], lx[d1] = lx[d1], lx[d0]
        return tuple(lx)

    def expand(self, node: fx.Node, x: Any) -> Any:
        lx, sx, so = self.lab(x), self.shape(x), self.shape(node)
        if sx is None or so is None:
            return self.boundary(node, "expand")
        off = len(so) - len(sx)
        out: list[DimLabel] = [None] * len(so)
        for i, n in enumerate(sx):
            if n == so[off + i]:
                out[off + i] = lx[i]
            elif n != 1:
                self.cut(node, lx[i], "repeat")  # repeat of a non-singleton dim tiles it
        return tuple(out)

    def split(self, node: fx.Node, name: str, x: Any) -> Any:
        lx, sx, so = list(self.lab(x)), self.shape(x), self.shapes.get(node)
        if sx is None or not isinstance(so, list) or not all(isinstance(s, torch.Size) for s in so):
            return self.boundary(node, f".{name}()")
        d: Any = node.args[2] if name != "unbind" and len(node.args) > 2 else node.kwargs.get("dim", 0)
        if name == "unbind":
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        d = int(d) % len(sx)
        if name == "unbind":
            self.cut(node, lx[d], "unbind of a channel dim")
            return [tuple(lx[:d] + lx[d + 1 :]) for _ in so]
        label = self.sp.resolve(lx[d])
        sizes = [s[d] for s in so]
        pieces: list[DimLabel] = [None] * len(so)
        if isinstance(label, Repeat):
            self.cut(node, label, "split of a flattened channel dim")
        elif label is not None:
            parts = label.parts if isinstance(label, Blocks) else ((label, self.sp.size[label]),)
            bounds, acc = {0: 0}, 0
            for k, (_, n) in enumerate(parts):
                acc += n
                bounds[acc] = k + 1
            start = 0
            for k, n in enumerate(sizes):
                if start in bounds and start + n in bounds and bounds[start + n] > bounds[start]:
                    sub = parts[bounds[start] : bounds[start + n]]
                    pieces[k] = sub[0][0] if len(sub) == 1 else Blocks(tuple(sub))
                else:
                    self.cut(node, label, "split inside a channel block")
                    pieces = [None] * len(so)
                    break
                start += n
        return [tuple(lx[:d] + [pieces[k]] + lx[d + 1 :]) for k in range(len(so))]

    def getitem(self, node: fx.Node, x: Any, idx: Any) -> Any:
        lx = self.lab(x)
        if not self.is_tensor(x):
            if isinstance(lx, (list, tuple)) and isinstance(idx, int):
                return lx[idx]
            if isinstance(lx, (list, tuple)) and isinstance(idx, slice):
                return list(lx[idx])
            if isinstance(lx, Mapping) and idx in lx:
                return lx[idx]
            return self.none_like(self.shapes.get(node))
        items = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, (fx.Node, list, Tensor)) for i in items):
            return self.boundary(node, "indexing with a tensor")
        n_consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        out: list[DimLabel] = []
        d = 0
        for i in items:
            if i is Ellipsis:
                k = len(lx) - n_consumed
                out.extend(lx[d : d + k])
                d += k
            elif i is None:
                out.append(None)
            elif isinstance(i, slice):
                out.append(self._slice(node, lx[d], i, self.shape(x)[d]))  # type: ignore[index]
                d += 1
            else:  # an integer: picks one channel
                self.cut(node, lx[d], "index into a channel dim")
                d += 1
        out.extend(lx[d:])
        return tuple(out)

    def _slice(self, node: fx.Node, label: DimLabel, i: slice, size: int) -> DimLabel:
        """A slice that takes whole blocks of a concatenation keeps them; any other slice is fixed."""
        if any(not isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step)):
            self.cut(node, label, "slice with traced bounds")
            return None
        start, stop, step = i.indices(size)
        if step == 1 and start == 0 and stop == size:
            return label
        r = self.sp.resolve(label)
        if r is None:
            return None
        if isinstance(r, Repeat):
            self.cut(node, label, "slice of a flattened channel dim")
            return None
        parts = r.parts if isinstance(r, Blocks) else ((r, self.sp.size[r]),)
        offsets = [0]
        for _, n in parts:
            offsets.append(offsets[-1] + n)
        if step == 1 and start in offsets and stop in offsets and stop > start:
            sub = parts[offsets.index(start) : offsets.index(stop)]
            return sub[0][0] if len(sub) == 1 else Blocks(tuple(sub))
        self.cut(node, label, "slice of a channel dim")
        return None

    def generic(self, node: fx.Node, what: str) -> Any:
        # ops on non-tensors only (shape arithmetic) need no constraint
        touched = [self.lab(a) for a in list(node.args) + list(node.kwargs.values())]
        if not self._has_space(touched) and not self._touches_tensor(node):
            return self.none_like(self.shapes.get(node))
        return self.boundary(node, f"{what} not understood")

    def _touches_tensor(self, node: fx.Node) -> bool:
        found = False

        def visit(a: Any) -> None:
            nonlocal found
            if isinstance(a, fx.Node) and self.is_tensor(a):
                found = True

        fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def visit_function(self, node: fx.Node, fn: Any) -> Any:
        args: Any = node.args
        x = args[0] if args else next(iter(node.kwargs.values()), None)
        name = getattr(fn, "__name__", str(fn))
        if fn is operator.getitem:
            return self.getitem(node, args[0], args[1])
        if fn is getattr:
            if args[1] in ("T", "mT") and self.is_tensor(args[0]):
                return self.permute_like(
                    node, "t" if args[1] == "T" else "transpose", args[0], (-2, -1) if args[1] == "mT" else ()
                )
            return self.none_like(self.shapes.get(node))
        if fn in (torch._assert, torch._assert_async) or name in ("_assert",):
            return None
        if not self._touches_tensor(node):
            return self.none_like(self.shapes.get(node))
        rule = rule_for_function(fn)
        if rule is not None:
            return self.apply_rule(node, rule, x, f"function {name}")
        if name in _DROP_PATH_NAMES and self.is_tensor(x):
            if self.shape(node) == self.shape(x):
                return self.lab(x)
            return self.boundary(node, name)
        handler = _FUNCTION_HANDLERS.get(fn)
        if handler is not None:
            return handler(self, node, fn, x)
        dim = _position_only_dim(fn)
        if dim is not None and self.is_tensor(x):
            return self.position_only(node, x, dim, name)
        method = _window_function(fn)
        if method is not None and self.is_tensor(x):
            return getattr(self, method)(node, x)
        return self.generic(node, f"function {name}")

    def _state_key(self, a: Any) -> str | None:
        """The state_dict key a ``get_attr`` argument reads (None for anything computed)."""
        if isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in self.state:
            return self.alias.get(str(a.target), str(a.target))
        return None

    def tv_relative_position_bias(self, node: fx.Node, table: Any) -> Any:
        """torchvision's ``(L, heads)`` table -> ``(1, heads, N, N)``: rows are positions (fixed); the head
        columns move only with whole heads, which the attention using it decides."""
        self.sp.fix([self.lab(a) for a in list(node.args) + list(node.kwargs.values())])  # table, index
        key = self._state_key(table)
        if key is not None:
            self.fix_param(key)
            self.bias_tables[node] = key
        return self.none_like(self.shapes.get(node))

    def tv_patch_merging(self, node: fx.Node, x: Any) -> Any:
        """torchvision's ``(..., H, W, C) -> (..., H/2, W/2, 4C)``: 4 tokens concatenated, one permutation."""
        lx, sx, so = list(self.lab(x)), self.shape(x), self.shape(node)
        if sx is None or so is None or len(sx) != len(so) or so[-1] != 4 * sx[-1]:
            return self.boundary(node, "function _patch_merging_pad with unexpected shapes")
        self.cut(node, lx[:-1], "function _patch_merging_pad moves a channel dim")
        tiled = self._tiles_channels([lx[-1]])
        return (None,) * (len(so) - 1) + (Blocks(tiled * 4) if tiled is not None else None,)

    def tv_window_attention(self, node: fx.Node, x: Any) -> Any:
        """torchvision's ``shifted_window_attention`` (Swin v1): as :meth:`window_attention`, on
        ``(B, H, W, C)``, with the weights passed as arguments. Swin v2 (a logit scale) stays a boundary."""
        names = ["qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads"]
        qkv_w, proj_w, bias, _, num_heads = (self.arg(node, i + 1, n) for i, n in enumerate(names))
        qkv_b, proj_b = self.arg(node, 9, "qkv_bias"), self.arg(node, 10, "proj_bias")
        keys = {"qkv.weight": self._state_key(qkv_w), "proj.weight": self._state_key(proj_w)}
        keys |= {"qkv.bias": self._state_key(qkv_b), "proj.bias": self._state_key(proj_b)}
        shape = self.shape(qkv_w)
        if (
            self.arg(node, 11, "logit_scale") is not None
            or not isinstance(num_heads, int)
            or keys["qkv.weight"] is None
            or keys["proj.weight"] is None
            or (qkv_b is not None and keys["qkv.bias"] is None)
            or (proj_b is not None and keys["proj.bias"] is None)
            or shape is None
            or shape[0] % (3 * num_heads)
        ):
            return self.boundary(node, "function shifted_window_attention not understood")
        lx, head_dim = self.lab(x), shape[0] // (3 * num_heads)
        qk, v = self.heads(node.name, num_heads, head_dim)
        qkv_out = Blocks(tuple((s, head_dim) for s in qk + qk + v))
        self.bind(keys["qkv.weight"], 1, lx[-1])  # type: ignore[arg-type]
        for k in ("qkv.weight", "qkv.bias"):
            if keys[k] is not None:
                self.bind(keys[k], 0, qkv_out)  # type: ignore[arg-type]
        self.bind(keys["proj.weight"], 1, Blocks(tuple((s, head_dim) for s in v)))  # type: ignore[arg-type]
        out = self.param(keys["proj.weight"])[0]  # type: ignore[arg-type,index]
        if keys["proj.bias"] is not None:
            out = self.bind(keys["proj.bias"], 0, out)
        self.sp.fix(self.lab(bias))
        table = self.bias_tables.get(bias) if isinstance(bias, fx.Node) else None
        if table is not None:  # heads move with their bias columns; an unknown bias keeps them in place
            axes: dict[str, tuple[int, ...]] = {keys["qkv.weight"]: (0, 3), keys["proj.weight"]: (1, 1)}  # type: ignore[dict-item]
            if keys["qkv.bias"] is not None:
                axes[keys["qkv.bias"]] = (0, 3)
            axes[table] = (1, 1, 1)
            prefix = keys["qkv.weight"].rsplit(".", 2)[0]  # type: ignore[union-attr]
            self.head_group(f"P_{prefix}.heads", num_heads, head_dim, axes)
        return tuple(lx[:-1]) + (out,)

    def position_only(self, node: fx.Node, x: Any, dim: int, name: str) -> Any:
        """A function that only moves positions (windows): the channel dim keeps its label; any other
        dim that carried a channel is fixed (its entries are rearranged)."""
        lx, sx, so = list(self.lab(x)), self.shape(x), self.shape(node)
        if sx is None or so is None or not sx or not so or sx[dim] != so[dim]:
            return self.boundary(node, f"function {name} with unexpected shapes")
        d = dim % len(sx)
        self.cut(node, [lab for i, lab in enumerate(lx) if i != d], f"function {name} moves a channel dim")
        out: list[DimLabel] = [None] * len(so)
        out[dim % len(so)] = lx[d]
        return tuple(out)

    def cat(self, node: fx.Node) -> Any:
        tensors = self.arg(node, 0, "tensors")
        dim = self.arg(node, 1, "dim", 0)
        so = self.shape(node)
        if (
            so is None
            or not isinstance(tensors, (list, tuple))
            or not all(self.is_tensor(t) for t in tensors)
        ):
            return self.boundary(node, "cat")
        d = int(dim) % len(so)
        out: list[DimLabel] = []
        for i in range(len(so)):
            if i == d:
                for t in tensors:  # a flattened channel dim is not followed inside a concatenation
                    if isinstance(self.sp.resolve(self.lab(t)[i]), Repeat):
                        self.cut(node, self.lab(t)[i], "cat of a flattened channel dim")
                parts = tuple((self.lab(t)[i], self.shape(t)[i]) for t in tensors if self.shape(t)[i] > 0)  # type: ignore[index]
                out.append(
                    self.sp.resolve(Blocks(parts)) if len(parts) > 1 else (parts[0][0] if parts else None)
                )
            else:
                cur: Any = ...
                for t in tensors:
                    cur = self.lab(t)[i] if cur is ... else self.sp.merge(cur, self.lab(t)[i])
                out.append(None if cur is ... else cur)
        return tuple(out)

    def stack(self, node: fx.Node) -> Any:
        tensors = self.arg(node, 0, "tensors")
        so = self.shape(node)
        if (
            so is None
            or not isinstance(tensors, (list, tuple))
            or not all(self.is_tensor(t) for t in tensors)
        ):
            return self.boundary(node, "stack")
        d = int(self.arg(node, 1, "dim", 0)) % len(so)
        merged: list[DimLabel] = list(self.lab(tensors[0]))
        for t in tensors[1:]:
            merged = [self.sp.merge(a, b) for a, b in zip(merged, self.lab(t))]
        return tuple(merged[:d] + [None] + merged[d:])

    def einsum(self, node: fx.Node) -> Any:
        eq = node.args[0]
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if not isinstance(eq, str) or "..." in eq or "->" not in eq:
            return self.boundary(node, "einsum")
        lhs, rhs = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        if len(terms) != len(ops) or not all(self.is_tensor(o) for o in ops):
            return self.boundary(node, "einsum")
        letters: dict[str, DimLabel] = {}
        sizes: dict[str, int] = {}
        for term, op in zip(terms, ops):
            for ch, lab, n in zip(term, self.lab(op), self.shape(op)):  # type: ignore[arg-type]
                if n == 1 and sizes.get(ch, 1) != 1:
                    continue
                letters[ch] = lab if ch not in letters else self.sp.merge(letters[ch], lab)
                sizes[ch] = n
        return tuple(letters.get(ch) for ch in rhs)


# ====================================================================================== spec assembly
# ====================================================================================== function table
# torch functions the walker understands, by what they do to channel dims. Elementwise ops, activations and
# casts are in trace_rules.py's public table; anything in neither becomes a boundary (``_Walker.generic``).
Handler = Callable[[_Walker, fx.Node, Any, Any], Any]


def _binary(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # elementwise with broadcasting: operands share the labels of the dims they align on
    return w.broadcast(
        node, [v for v in list(node.args) + list(node.kwargs.values()) if isinstance(v, fx.Node)]
    )


def _reduction(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # a reduced dim disappears (a reduced channel dim is fixed); the others keep their labels
    return w.reduce(node, x, w.arg_dim(node, 2 if fn in (torch.norm, torch.linalg.vector_norm) else 1))


def _reshape(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # one-to-one dims keep their label; (C, H, W) -> C*H*W flattens a channel dim; other merges are fixed
    return w.reshape(node, x)


def _transpose(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # dims move, labels move with them
    name = {torch.swapaxes: "transpose", torch.t: "t"}.get(fn, getattr(fn, "__name__", str(fn)))
    return w.permute_like(node, name, x, node.args[1:])


def _split(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # pieces that take whole blocks of a concatenation keep them
    return w.split(node, getattr(fn, "__name__", str(fn)), x)


def _matmul(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # the contracted dims share a permutation (a sum over them is invariant to it)
    return w.matmul(node, node.args[0], node.args[1])


def _cat(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # the joined dim is the concatenation of its inputs' labels (a block axis)
    return w.cat(node)


def _stack(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    return w.stack(node)


def _pool(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # pooling acts on the trailing spatial dims only
    return w.spatial(node, x, _SPATIAL_FUNCS[fn])


def _resize(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # interpolation and padding change spatial dims (padding: the last len(pad) // 2 dims)
    sx = w.shape(x)
    if fn is F.pad:
        pad, lx = w.arg(node, 1, "pad", ()), w.lab(x)
        if sx and isinstance(pad, (list, tuple)) and len(pad) % 2 == 0:
            # pad's pairs start at the last dim: a dim whose pair is a literal (0, 0) keeps its entries
            # (Swin pads H and W by traced amounts, never C); any other pair moves them
            padded = {len(sx) - 1 - i // 2 for i, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
            if w.shape(node) is None or len(w.shape(node)) != len(sx) or min(padded, default=0) < 0:  # type: ignore[arg-type]
                return w.boundary(node, "padding with unexpected shapes")
            w.cut(node, [lx[d] for d in sorted(padded)], "padding a channel dim")
            return tuple(None if d in padded else lab for d, lab in enumerate(lx))
        k = len(pad) // 2
    else:
        k = len(sx) - 2 if sx else 0
    return w.spatial(node, x, max(k, 1))


def _roll(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # a cyclic shift along the given dims (Swin's shifted windows): the other dims keep their channels
    dims, lx, sx = w.arg(node, 2, "dims"), w.lab(x), w.shape(x)
    dims = (dims,) if isinstance(dims, int) else dims
    if not sx or not isinstance(dims, (list, tuple)) or not dims or not all(isinstance(d, int) for d in dims):
        return w.boundary(node, "roll of the flattened tensor")
    rolled = {d % len(sx) for d in dims}
    w.cut(node, [lx[d] for d in sorted(rolled)], "roll along a channel dim")
    return tuple(None if d in rolled else lab for d, lab in enumerate(lx))


def _f_linear(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    return w.linear(x, w.lab(w.arg(node, 1, "weight")), w.lab(w.arg(node, 2, "bias")), None)


def _f_conv(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    weight, bias = w.arg(node, 1, "weight"), w.arg(node, 2, "bias")
    return w.conv(node, x, weight, bias, int(w.arg(node, 6, "groups", 1)))


def _f_batch_norm(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # per-channel statistics and affine parameters follow dim 1
    names = ["running_mean", "running_var", "weight", "bias"]
    return w.per_channel(x, [w.lab(w.arg(node, i + 1, n)) for i, n in enumerate(names)])


def _f_layer_norm(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # normalises over the last k dims: their channels may move, the affine parameters with them
    shape = w.arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    names = ["weight", "bias"] if fn is F.layer_norm else ["weight"]
    return w.layer_norm(x, k, [w.lab(w.arg(node, i + 2, n)) for i, n in enumerate(names)])


def _f_group_norm(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # statistics per group of channels: only permutations inside each group keep them
    names = ["weight", "bias"]
    groups = int(w.arg(node, 1, "num_groups"))
    return w.group_norm(node, x, groups, [w.lab(w.arg(node, i + 2, n)) for i, n in enumerate(names)])


def _f_sdpa(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # attention: query/key share the contracted dim, value's channels pass to the output
    return w.sdpa(node.args[0], w.arg(node, 1, "key"), w.arg(node, 2, "value"), w.arg(node, 3, "attn_mask"))


def _einsum(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    return w.einsum(node)


def _f_embedding(w: _Walker, node: fx.Node, fn: Any, x: Any) -> Any:
    # rows are looked up by index (fixed); the embedding dim is a channel dim
    weight = w.lab(w.arg(node, 1, "weight"))
    w.sp.fix([w.lab(x), weight[0]])
    return (None,) * len(w.shape(x)) + (weight[1],)  # type: ignore[arg-type]


_FUNCTION_HANDLERS: dict[Any, Handler] = {
    **dict.fromkeys(_BINARY, _binary),
    **dict.fromkeys(_REDUCTIONS, _reduction),
    **dict.fromkeys(_RESHAPES, _reshape),
    **dict.fromkeys((torch.permute, torch.transpose, torch.movedim, torch.swapaxes, torch.t), _transpose),
    **dict.fromkeys((torch.chunk, torch.split, torch.unbind, torch.tensor_split), _split),
    **dict.fromkeys((operator.matmul, torch.matmul, torch.bmm, torch.mm), _matmul),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), _cat),
    torch.stack: _stack,
    **dict.fromkeys(_SPATIAL_FUNCS, _pool),
    **dict.fromkeys((F.interpolate, F.upsample, F.pad), _resize),
    torch.roll: _roll,
    F.linear: _f_linear,
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), _f_conv),
    **dict.fromkeys((F.batch_norm, F.instance_norm), _f_batch_norm),
    **dict.fromkeys(
        [f for f in (F.layer_norm, getattr(F, "rms_norm", None)) if f is not None], _f_layer_norm
    ),
    F.group_norm: _f_group_norm,
    F.scaled_dot_product_attention: _f_sdpa,
    torch.einsum: _einsum,
    F.embedding: _f_embedding,
}


# ====================================================================================== module table
# Built-in modules the walker understands, keyed by type; a subclass uses its nearest listed base
# (``_module_handler``). Registered rules (trace_rules.py) and timm's attention pattern come first.
ModuleHandler = Callable[[_Walker, fx.Node, Any, Any], Any]


def _m_linear(w: _Walker, node: fx.Node, m: nn.Linear, x: Any) -> Any:
    t = str(node.target)
    return w.linear(x, w.param(f"{t}.weight"), w.param(f"{t}.bias") if m.bias is not None else None, None)


def _m_conv(w: _Walker, node: fx.Node, m: nn.Module, x: Any) -> Any:
    t = str(node.target)
    bias = f"{t}.bias" if getattr(m, "bias", None) is not None else None
    return w.conv(node, x, f"{t}.weight", bias, int(m.groups))  # type: ignore[arg-type]


def _m_conv_transpose(w: _Walker, node: fx.Node, m: nn.Module, x: Any) -> Any:
    if m.groups != 1:
        return w.boundary(node, f"module {type(m).__name__} not understood")
    t = str(node.target)
    bias = f"{t}.bias" if getattr(m, "bias", None) is not None else None
    return w.conv(node, x, f"{t}.weight", bias, 1, True)


def _m_tensors(w: _Walker, node: fx.Node, names: Sequence[str]) -> list[Any]:
    t = str(node.target)
    return [w.param(f"{t}.{n}") for n in names if f"{t}.{n}" in w.state]


def _m_batch_norm(w: _Walker, node: fx.Node, m: nn.Module, x: Any) -> Any:
    # BatchNorm*, SyncBatchNorm, InstanceNorm*: per-channel statistics and affine parameters
    return w.per_channel(x, _m_tensors(w, node, ("weight", "bias", "running_mean", "running_var")))


def _m_layer_norm(w: _Walker, node: fx.Node, m: Any, x: Any) -> Any:
    return w.layer_norm(x, len(m.normalized_shape), _m_tensors(w, node, ("weight", "bias")))


def _m_group_norm(w: _Walker, node: fx.Node, m: nn.GroupNorm, x: Any) -> Any:
    return w.group_norm(node, x, m.num_groups, _m_tensors(w, node, ("weight", "bias")))


def _m_prelu(w: _Walker, node: fx.Node, m: nn.PReLU, x: Any) -> Any:
    if m.num_parameters == 1:
        return w.lab(x)
    return w.per_channel(x, [w.param(f"{node.target}.weight")])


def _m_pool(w: _Walker, node: fx.Node, m: nn.Module, x: Any) -> Any:
    return w.spatial(node, x, _SPATIAL_MODULES[type(m)])


def _m_resize(w: _Walker, node: fx.Node, m: nn.Module, x: Any) -> Any:
    sx = w.shape(x)
    return w.spatial(node, x, 2 if sx and len(sx) >= 3 else 1)


def _m_reshape(w: _Walker, node: fx.Node, m: nn.Module, x: Any) -> Any:
    return w.reshape(node, x)


def _m_embedding(w: _Walker, node: fx.Node, m: nn.Embedding, x: Any) -> Any:
    weight = w.param(f"{node.target}.weight")
    w.sp.fix(weight[0])  # type: ignore[index]  # rows are looked up by index
    w.sp.fix(w.lab(x))
    return (None,) * len(w.shape(x)) + (weight[1],)  # type: ignore[arg-type,index]


def _m_multihead_attention(w: _Walker, node: fx.Node, m: nn.MultiheadAttention, x: Any) -> Any:
    return w.multihead_attention(node, m)


# Gate blocks stacked along the rows of a recurrent layer's weights (torch's order: LSTM i, f, g, o;
# GRU r, z, n). A permutation of hidden units acts alike on every block: each gate is elementwise in them.
_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _live(node: fx.Node) -> bool:
    """Whether anything reads ``node``'s value (unpacking alone, ``a, (b, c) = ...``, does not)."""
    return any(u.target is not operator.getitem or _live(u) for u in node.users)


def _reads_state(node: fx.Node) -> bool:
    """Whether the returned final state (``h_n``, or ``(h_n, c_n)``) of a recurrent call is read."""
    for u in node.users:
        index = u.args[1] if u.target is operator.getitem and len(u.args) > 1 else None
        if not isinstance(index, int):
            return True  # the whole ``(output, state)`` pair goes somewhere the walk cannot split
        if index % 2 == 1 and _live(u):
            return True
    return False


# A tensor filled with one value (a zero initial state) is unchanged by any permutation: it constrains nothing.
_FILLS = {torch.zeros, torch.ones, torch.full, torch.zeros_like, torch.ones_like, torch.full_like}
_FILL_METHODS = {"new_zeros", "new_ones", "new_full"}
# ops that keep a filled tensor filled (casts, moves, shape changes)
_KEEPS_FILLED = {
    "to", "type_as", "cuda", "cpu", "float", "double", "half", "bfloat16", "detach", "contiguous", "clone",
    "view", "reshape", "expand", "expand_as", "repeat", "unsqueeze", "squeeze", "permute", "transpose",
}  # fmt: skip


def _is_filled(value: Any) -> bool:
    """Whether a graph value is a tensor filled with one value and never written to afterwards."""
    node = value
    while isinstance(node, fx.Node):
        if any(
            (u.op == "call_method" and str(u.target).endswith("_"))
            or (u.op == "call_function" and getattr(u.target, "__name__", "").endswith(("_", "setitem")))
            for u in node.users
        ):
            return False  # written in place: no longer known to be filled
        if node.op == "call_function" and node.target in _FILLS:
            return True
        if node.op == "call_method" and node.target in _FILL_METHODS:
            return True
        if node.op == "call_method" and node.target in _KEEPS_FILLED and node.args:
            node = node.args[0]
            continue
        return False
    return False


def _initial_state(w: _Walker, node: fx.Node, hx: Any, spaces: Sequence[DimLabel]) -> None:
    """An initial state given to a recurrent call seeds the hidden units: its feature axis joins them."""
    label = w.lab(hx)
    if isinstance(hx, (list, tuple)):
        parts = list(zip(hx, label))
    elif isinstance(label, list):  # an LSTM's (h, c) as one value, e.g. another LSTM's final state
        parts = [(None, lab) for lab in label]
    else:
        parts = [(hx, label)]
    if len(parts) != len(spaces):
        w.cut(node, [*spaces, label], "an initial state not understood")
        return
    for (value, lab), space in zip(parts, spaces):
        if value is not None and _is_filled(value):
            continue
        if not isinstance(lab, tuple) or not lab:
            w.cut(node, [space, lab], "an initial state not understood")
            continue
        w.cut(node, list(lab[:-1]), "an initial state's layer and batch positions")
        if w.sp.resolve(lab[-1]) is None:  # a state given in a fixed basis (an input) pins the hidden units
            w.cut(node, space, "an initial state in a fixed basis")
        w.sp.merge(lab[-1], space)


def _needs_state(hx: Any) -> bool:
    """Whether an initial state is given that is not filled with one value (zeros)."""
    parts = hx if isinstance(hx, (list, tuple)) else [hx]
    return any(p is not None and not _is_filled(p) for p in parts)


def _m_recurrent(w: _Walker, node: fx.Node, m: nn.RNNBase, x: Any) -> Any:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: one group of hidden units per layer and direction.

    It permutes the rows of every gate block of ``weight_ih_l{k}`` / ``weight_hh_l{k}`` and both biases, the
    columns of ``weight_hh_l{k}`` (the recurrence reads its own output), and the next layer's input columns;
    with ``proj_size`` a second group permutes the projected outputs (rows of ``weight_hr_l{k}``, columns
    of ``weight_hh_l{k}``) while the hidden group permutes ``weight_hr_l{k}``'s columns. The output's feature
    axis is the concatenation ``[forward, backward]`` of the last layer's groups. A final state that is read
    (or an initial state that is given, unless it is filled with one value such as zeros) stacks every layer
    and direction on one axis: they then share one permutation (cell states one, outputs another)."""
    t, gates = str(node.target), _RECURRENT_GATES.get(str(m.mode))
    lx, sx, structure = w.lab(x), w.shape(x), w.shapes.get(node)
    if gates is None or lx is None or sx is None or len(sx) not in (2, 3) or not isinstance(structure, list):
        return w.boundary(node, f"recurrent {type(m).__name__} (mode {m.mode!r}) on input {sx}")
    w.cut(node, list(lx[:-1]), "a recurrence runs over the sequence positions")
    hidden, proj = m.hidden_size, int(getattr(m, "proj_size", 0) or 0)
    width = proj or hidden
    directions = ("", "_reverse") if m.bidirectional else ("",)
    cells: list[int] = []
    outs: list[int] = []
    feature: DimLabel = lx[-1]
    for k in range(m.num_layers):
        layer: list[int] = []
        for d in directions:
            h = w.sp.new(hidden, f"P_{t}.h{k}{d}")
            o = w.sp.new(proj, f"P_{t}.proj{k}{d}") if proj else h
            rows = Blocks(((h, hidden),) * gates)  # one block per gate (a single one for nn.RNN)
            w.bind(f"{t}.weight_ih_l{k}{d}", 0, rows)
            w.bind(f"{t}.weight_ih_l{k}{d}", 1, feature)
            w.bind(f"{t}.weight_hh_l{k}{d}", 0, rows)
            w.bind(f"{t}.weight_hh_l{k}{d}", 1, o)
            if m.bias:
                w.bind(f"{t}.bias_ih_l{k}{d}", 0, rows)
                w.bind(f"{t}.bias_hh_l{k}{d}", 0, rows)
            if proj:
                w.bind(f"{t}.weight_hr_l{k}{d}", 0, o)
                w.bind(f"{t}.weight_hr_l{k}{d}", 1, h)
            cells.append(h)
            outs.append(o)
            layer.append(o)
        feature = layer[0] if len(layer) == 1 else Blocks(tuple((o, width) for o in layer))
    output = (None,) * (len(sx) - 1) + (feature,)
    hx = w.arg(node, 1, "hx")
    is_lstm = m.mode == "LSTM"
    n_state = len(sx)  # (layers * directions, [batch,] features)
    if not (_reads_state(node) or _needs_state(hx)):
        unread = (None,) * n_state
        return [output, [unread, unread] if is_lstm else unread]
    shared_out: DimLabel = outs[0]
    for o in outs[1:]:
        shared_out = w.sp.merge(shared_out, o)
    shared_cell: DimLabel = cells[0]
    for c in cells[1:]:
        shared_cell = w.sp.merge(shared_cell, c)
    spaces = [shared_out, shared_cell] if is_lstm else [shared_out]
    if hx is not None:
        _initial_state(w, node, hx, spaces)
    state_labels = [(None,) * (n_state - 1) + (s,) for s in spaces]
    return [output, state_labels if is_lstm else state_labels[0]]


def _m_recurrent_cell(w: _Walker, node: fx.Node, m: nn.RNNCellBase, x: Any) -> Any:
    """``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` (one step, called in an unrolled loop): one group of
    hidden units per cell, shared by every call, on the gate blocks, ``weight_hh``'s columns and the state."""
    t, sx, lx = str(node.target), w.shape(x), w.lab(x)
    gates = 4 if isinstance(m, nn.LSTMCell) else 3 if isinstance(m, nn.GRUCell) else 1
    if (
        sx is None
        or lx is None
        or len(sx) not in (1, 2)
        or not isinstance(m, (nn.LSTMCell, nn.GRUCell, nn.RNNCell))
    ):
        return w.boundary(node, f"recurrent cell {type(m).__name__} on input {sx}")
    w.cut(node, list(lx[:-1]), "a recurrent cell's batch positions")
    h = w.sp.new(m.hidden_size, f"P_{t}")
    rows = Blocks(((h, m.hidden_size),) * gates)
    w.bind(f"{t}.weight_ih", 0, rows)
    w.bind(f"{t}.weight_ih", 1, lx[-1])
    w.bind(f"{t}.weight_hh", 0, rows)
    w.bind(f"{t}.weight_hh", 1, h)
    if m.bias:
        w.bind(f"{t}.bias_ih", 0, rows)
        w.bind(f"{t}.bias_hh", 0, rows)
    spaces = [h, h] if gates == 4 else [h]
    hx = w.arg(node, 1, "hx")
    if hx is not None:
        _initial_state(w, node, hx, spaces)
    state = (None,) * (len(sx) - 1) + (h,)
    return [state, state] if gates == 4 else state


_MODULE_HANDLERS: dict[type, ModuleHandler] = {
    nn.Linear: _m_linear,
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _m_conv),
    **dict.fromkeys((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _m_conv_transpose),
    nn.modules.batchnorm._NormBase: _m_batch_norm,
    **dict.fromkeys((nn.LayerNorm, nn.RMSNorm), _m_layer_norm),
    nn.GroupNorm: _m_group_norm,
    nn.PReLU: _m_prelu,
    **dict.fromkeys(_SPATIAL_MODULES, _m_pool),
    **dict.fromkeys(
        (nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d), _m_resize
    ),
    **dict.fromkeys((nn.Flatten, nn.Unflatten), _m_reshape),
    nn.Embedding: _m_embedding,
    nn.MultiheadAttention: _m_multihead_attention,
    nn.RNNBase: _m_recurrent,
    nn.RNNCellBase: _m_recurrent_cell,
}


def _module_handler(cls: type) -> ModuleHandler | None:
    """The handler of the nearest class in ``cls``'s MRO that the table lists (``isinstance`` semantics),
    except for pooling, which is matched by exact type (its dimensionality comes from the type)."""
    for base in cls.__mro__:
        handler = _MODULE_HANDLERS.get(base)
        if handler is not None and (handler is not _m_pool or base is cls):
            return handler
    return None


def _assemble(walker: _Walker, state: Mapping[str, Tensor]) -> PermutationSpec:
    sp = walker.sp
    names: dict[int, str] = {}
    sizes: dict[str, int] = {}

    def group_of(space: int) -> str | None:
        if sp.size[space] <= 1:
            return None
        if space not in names:
            base = sp.name[space]
            name, k = base, 2
            while name in sizes:
                name, k = f"{base}#{k}", k + 1
            names[space], sizes[name] = name, sp.size[space]
        return names[space]

    axes: dict[str, tuple] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        labels = walker.bindings.get(walker.alias.get(key, key))
        entry: list[Any] = []
        for ax in range(value.ndim):
            r = sp.resolve(labels[ax]) if labels is not None else None
            if isinstance(r, Blocks):  # fixed blocks are written as their length
                blocks = tuple((group_of(s) if s is not None else None) or n for s, n in r.parts)
                entry.append(blocks if any(isinstance(b, str) for b in blocks) else None)
            elif isinstance(r, Repeat):  # a flattened group: one block, k entries per unit
                g = group_of(r.space)
                entry.append(((g, r.k),) if g is not None else None)
            else:
                entry.append(group_of(r) if isinstance(r, int) else None)
        axes[key] = tuple(entry)
    block_axes: dict[str, tuple] = {}
    for name, n, structure, k in _channel_block_groups(walker):
        sizes[name] = n
        for key, value in state.items():
            labels = walker.bindings.get(walker.alias.get(key, key))
            if not isinstance(value, Tensor) or labels is None:
                continue
            entry = [
                ((name, k),) if isinstance(r, Blocks) and r.parts == structure else None
                for r in (sp.resolve(lab) for lab in labels)
            ]
            if any(e is not None for e in entry):
                old = block_axes.get(key, (None,) * value.ndim)
                block_axes[key] = tuple(e if e is not None else o for e, o in zip(entry, old))
    for name, (num_heads, entries) in walker.head_groups.items():
        sizes[name] = num_heads
        block_axes.update(entries)
    return PermutationSpec.from_axes(axes, state, sizes=sizes, block_axes=block_axes)


def _channel_block_groups(walker: _Walker) -> list[tuple[str, int, tuple, int]]:
    """``(name, number of groups, the resolved blocks it moves, channels per group)`` for every group of
    channels the walk found (grouped convolutions, GroupNorm). Records that share a structure are one group
    (one permutation); a structure that is fixed, does not split into equal groups, or is claimed with two
    different group counts is left out (its channels still move inside the groups)."""
    sp = walker.sp
    owner: dict[tuple, int] = {}  # structure -> record index (union-find over records)
    parent = list(range(len(walker.channel_groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    valid = [True] * len(walker.channel_groups)
    structures: list[list[tuple]] = []
    for i, (_, n, labels) in enumerate(walker.channel_groups):
        found = []
        for lab in labels:
            r = sp.resolve(lab)
            if not isinstance(r, Blocks) or r.size % n or not _periodic(r, r.size // n):
                valid[i] = False
                continue
            found.append(r.parts)
            if r.parts in owner:
                parent[find(i)] = find(owner[r.parts])
            else:
                owner[r.parts] = i
        structures.append(found)
    comps: dict[int, list[int]] = {}
    for i in range(len(parent)):
        comps.setdefault(find(i), []).append(i)
    out = []
    for members in comps.values():
        counts = {walker.channel_groups[i][1] for i in members}
        if not all(valid[i] for i in members) or len(counts) != 1:
            continue
        name, n, _ = walker.channel_groups[min(members)]
        for parts in dict.fromkeys(p for i in members for p in structures[i]):
            out.append((name, n, parts, sum(size for _, size in parts) // n))
    return out


def _periodic(blocks: Blocks, k: int) -> bool:
    """Whether every unit of ``k`` entries is made of whole blocks, with the same block sizes in each."""
    units: list[list[int]] = []
    pos = 0
    for _, size in blocks.parts:
        if pos // k != (pos + size - 1) // k:
            return False  # a block straddles two units
        if pos % k == 0:
            units.append([])
        units[-1].append(size)
        pos += size
    return all(u == units[0] for u in units)


def _drop_block(block: Any, drop: set[str], sizes: Mapping[str, int]) -> Any:
    """A block of an axis entry with a dropped group replaced by its length (a fixed block)."""
    if isinstance(block, str) and block in drop:
        return sizes[block]
    if isinstance(block, tuple) and block[0] in drop:
        return sizes[block[0]] * block[1]
    return block


def _drop_groups(spec: PermutationSpec, drop: Iterable[str], state: Mapping[str, Tensor]) -> PermutationSpec:
    """The same spec with the groups in ``drop`` fixed."""
    drop = set(drop)
    axes: dict[str, tuple] = {}
    for key, entry in spec.axes_to_perm.items():
        new: list[Any] = []
        for g in entry:
            if isinstance(g, tuple):
                blocks = tuple(_drop_block(b, drop, spec.sizes) for b in g)
                new.append(blocks if any(not isinstance(b, int) for b in blocks) else None)
            else:
                new.append(None if g in drop else g)
        axes[key] = tuple(new)
    block_axes = {
        key: tuple(None if any(g[0] in drop for g in e or ()) else e for e in entry)  # type: ignore[index,union-attr]
        for key, entry in spec.block_axes.items()
    }
    kept = {g: n for g, n in spec.sizes.items() if g not in drop}
    return PermutationSpec.from_axes(axes, state, sizes=kept, block_axes=block_axes)


# ====================================================================================== public API
def trace_spec(
    model: nn.Module,
    example_inputs: Any,
    *,
    check: bool = True,
    leaf_modules: Iterable[type | str] | None = None,
    rtol: float | None = None,
    seed: int | torch.Generator | None = None,
    heads: bool = True,
) -> PermutationSpec:
    """Derive the permutation spec of ``model`` from its computation graph.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (untraceable submodules become boundaries).
        example_inputs: a Tensor, a tuple of positional inputs or a dict of keyword inputs; used to record
            shapes (and by the check). A small batch is enough.
        check: verify the spec with :func:`check_spec` (float64, on a CPU copy) and drop any group that
            changes the outputs; the achieved error is kept in ``spec.check_error``.
        leaf_modules: module types or qualified names not to trace into; they become boundaries.
        rtol: tolerance of the check, relative to the output's magnitude (default: near float64 round-off,
            see :data:`~rebasin_callbacks.verify.DEFAULT_RTOL`, raised to follow the model's own measured
            round-off where it is larger, at most :data:`~rebasin_callbacks.verify.MAX_RTOL`).
        seed: an int or a ``torch.Generator`` for the check's random permutations, parameters and inputs.
        heads: permute the heads of attention layers as units (block groups, ``spec.block_axes``) on top
            of the units inside each head; ``False`` keeps every head in place.

    Returns:
        A :class:`PermutationSpec` keyed by ``model.state_dict()`` names (buffers included), with a size for
        every group. Group names follow the first module that produces the space, e.g. ``"P_layer1.0.conv1"``.

    Raises:
        UntraceableModelError: the model's own ``forward`` cannot be traced (names the construct). Anything
            inside it the tracer does not understand becomes a boundary instead, with a warning.
        ValueError: ``example_inputs`` are empty or not finite (with ``check=True``), or the model fails on
            them.

    Warns:
        UserWarning: once, listing the nodes that became boundaries and the groups dropped by the check.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import trace_spec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> spec = trace_spec(mlp, torch.randn(4, 2))
        >>> spec.axes_to_perm["0.weight"], spec.axes_to_perm["2.weight"]
        (('P_0', None), (None, 'P_0'))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    if check:
        validate_inputs(args, kwargs)  # before any work: an empty or NaN input cannot verify anything
    state = model.state_dict(keep_vars=True)
    was_training = model.training
    model.eval()  # trace the inference graph: no batch-statistics updates, dropout off
    try:
        gm, leaves = _build_graph(model, args, kwargs, leaf_modules)
        recorder = _Recorder(gm)
        with torch.no_grad():
            try:
                recorder.run(*_placeholder_values(gm, args, kwargs))
            except Exception as e:  # noqa: BLE001 - tell a bad input from a graph that does not run
                raise _run_error(model, args, kwargs, e) from e
        walker = _Walker(gm, recorder.shapes, state)
        walker.run()
        if not heads:
            walker.head_groups.clear()
    finally:
        model.train(was_training)
    plain_state = {k: v.detach() if isinstance(v, Tensor) else v for k, v in state.items()}
    notes: list[str] = [f"untraceable submodule {leaf}" for leaf in leaves]
    notes += walker.boundaries
    notes += _reparametrized(model)
    try:
        spec = _assemble(walker, plain_state)
    except SpecMismatchError as e:  # inconsistent labels from a rule: no group rather than a wrong one
        notes.append(f"the traced groups do not fit the state dict ({e}): every group dropped")
        spec = PermutationSpec.from_axes({}, plain_state)
    if check and len(spec):
        spec, check_notes = _verified(model, spec, example_inputs, rtol, as_generator(seed), plain_state)
        notes += check_notes
    if notes:
        shown = notes[:12] + ([f"... {len(notes) - 12} more"] if len(notes) > 12 else [])
        warnings.warn(
            f"trace_spec({type(model).__name__}): {len(notes)} boundaries (no permutation crosses them): "
            + "; ".join(shown),
            stacklevel=2,
        )
    return spec


def _reparametrized(model: nn.Module) -> list[str]:
    """Notes for weights computed by a reparametrization (``weight_norm`` and the like): the tracer does not
    permute through them, so without a word the user would only see fewer groups."""
    from torch.nn.utils import parametrize

    notes = []
    for name, m in model.named_modules():
        where = name or type(model).__name__
        if parametrize.is_parametrized(m):
            tensors = ", ".join(sorted(m.parametrizations.keys()))  # type: ignore[union-attr]
            notes.append(
                f"{where} has parametrized {tensors} (e.g. weight_norm): no permutation crosses it; "
                f"torch.nn.utils.parametrize.remove_parametrizations({where}, ...) before tracing lifts this"
            )
        elif any(type(h).__name__ == "WeightNorm" for h in m._forward_pre_hooks.values()):
            notes.append(
                f"{where} uses the old torch.nn.utils.weight_norm hook: no permutation crosses it; "
                "torch.nn.utils.remove_weight_norm before tracing lifts this"
            )
    return notes


def _verified(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    rtol: float | None,
    generator: torch.Generator | None,
    state: Mapping[str, Tensor],
) -> tuple[PermutationSpec, list[str]]:
    """``spec`` without the groups :func:`check_spec` blames (the achieved error in ``spec.check_error``)."""
    notes: list[str] = []
    for _ in range(3):
        try:
            err = check_spec(model, spec, example_inputs, rtol=rtol, seed=generator)
        except SpecCheckError as e:
            notes.append(
                "dropped groups that changed the outputs: "
                + ", ".join(f"{g} (rel. error {err:.2g})" for g, err in e.failing.items())
            )
            spec = _drop_groups(spec, e.failing, state)
            if not len(spec):
                break
        except ValueError:
            raise  # the model's outputs are not finite: a bad model or input, said as such
        except Exception as e:  # noqa: BLE001 - a spec that cannot be verified is not returned
            notes.append(f"the check could not run ({type(e).__name__}: {str(e)[:120]}): every group dropped")
            return _drop_groups(spec, spec.groups, state), notes
        else:
            spec.check_error = err
            return spec, notes
    if len(spec):
        notes.append("the check kept failing: every group dropped")
        spec = _drop_groups(spec, spec.groups, state)
    return spec, notes


def _run_error(model: nn.Module, args: tuple, kwargs: dict, error: BaseException) -> Exception:
    """A ValueError when the model itself fails on the example inputs; else the traced graph is at fault."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as eager:  # noqa: BLE001
        shapes = [tuple(a.shape) for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        return ValueError(
            f"{type(model).__name__} fails on example_inputs (tensor shapes {shapes}): "
            f"{type(eager).__name__}: {str(eager).splitlines()[0] if str(eager) else ''}"
        )
    return _untraceable_error(model, error)
