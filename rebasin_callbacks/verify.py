"""Verify that a permutation spec preserves what a model computes, at round-off level.

:func:`check_spec` permutes every group of a spec at random and compares the model's outputs before and
after. To tell round-off from a real change it works

* in float64, on a CPU copy of the model (the model itself is never touched: on a GPU, cuDNN's default TF32
  convolutions alone differ by ~1e-3, and half precision by more);
* on parameters that exercise the function: tensors that are constant or tiny at initialisation (zero
  biases, layer scales of 1e-5, relative-position bias tables, BatchNorm statistics of 0 / 1) would hide a
  wrong permutation of whatever they multiply, so the check draws them afresh (for the check only);
* on several inputs: the example and random inputs of the same shape, so outputs vary with the input.

In float64 an exact permutation changes outputs only by reordered sums (~1e-15 relative, 1e-13 for deep
networks); a wrong permutation of even a small bias moves them by 1e-6 or more. The default tolerance
(``1e-9``) sits between the two, so no real change passes and no correct group is dropped.

A deep or badly conditioned network amplifies round-off beyond that: the check then measures the model's
own round-off (a control run: every parameter perturbed by one unit in the last place, no permutation)
and allows :data:`ROUNDOFF_FACTOR` times it, never more than :data:`MAX_RTOL` (a real change of ``1e-7``
is still caught).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten_with_path, tree_leaves, tree_map

from rebasin_callbacks.permute import permute_state_dict
from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
from rebasin_callbacks.utils import as_generator

__all__ = [
    "check_spec",
    "SpecCheckError",
    "DEFAULT_RTOL",
    "aliases",
    "MAX_RTOL",
    "ROUNDOFF_FACTOR",
    "normalize_inputs",
    "validate_inputs",
]

#: Default tolerance per working dtype: float64 round-off of a deep network stays below ~1e-12 relative
#: (measured over the zoo sweep), real changes at initialisation are >= 1e-6; float32 (only on request, or
#: when a model cannot run in float64) cannot separate round-off (~1e-6) from small real changes.
DEFAULT_RTOL: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-4}
#: The most the measured round-off can raise the default tolerance to, per working dtype (float32 keeps its
#: default: its round-off is already too close to real changes).
MAX_RTOL: dict[torch.dtype, float] = {torch.float64: 5e-8, torch.float32: 1e-4}
#: How far above the control run's error a permutation's reordered sums may land. Measured (random exact
#: permutations of every group over the control): 0.4x on an MLP, 0.9x on resnet18, 0.5x on a ViT, 0.9x on
#: timm's tf_efficientnetv2_b0 at 64x64, whose own round-off is ~1e-8.
ROUNDOFF_FACTOR = 10.0


class SpecCheckError(AssertionError):
    """A spec changes what the model computes.

    ``failing`` maps each culprit group to its relative error; ``error`` is the error with every checked
    group permuted at once, ``rtol`` the tolerance, ``roundoff`` the model's own measured round-off (the
    control run; ``None`` when an explicit ``rtol`` was given) and ``dtype`` the precision the check ran in."""

    def __init__(
        self,
        message: str,
        failing: Mapping[str, float],
        *,
        error: float = math.inf,
        rtol: float = 0.0,
        dtype: torch.dtype = torch.float64,
        roundoff: float | None = None,
    ):
        super().__init__(message)
        self.failing = dict(failing)
        self.error, self.rtol, self.dtype, self.roundoff = error, rtol, dtype, roundoff


# ====================================================================================== inputs
def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a Tensor, a tuple / list of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a Tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _leaf_name(root: str, path: Sequence[Any]) -> str:
    return root + "".join(f"[{getattr(k, 'idx', getattr(k, 'key', k))!r}]" for k in path)


def validate_inputs(args: tuple, kwargs: dict) -> None:
    """Raise ``ValueError`` for inputs that cannot verify anything: no elements, or NaN / inf.

    An empty output compares as "no difference" and NaN never compares greater than a tolerance, so both
    would let any spec pass."""
    named: list[tuple[str, Any]] = []
    for i, a in enumerate(args):
        root = "example_inputs" if len(args) == 1 and not kwargs else f"example_inputs[{i}]"
        named += [(_leaf_name(root, p), v) for p, v in tree_flatten_with_path(a)[0]]
    for k, a in kwargs.items():
        named += [(_leaf_name(f"example_inputs[{k!r}]", p), v) for p, v in tree_flatten_with_path(a)[0]]
    for name, value in named:
        if not isinstance(value, Tensor):
            continue
        if value.numel() == 0:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} (no elements): outputs on an empty batch cannot show "
                "that a permutation changes the function; pass at least one row"
            )
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{name} of shape {tuple(value.shape)} contains {bad} NaN/inf values: a non-finite output "
                "compares as no difference, so the check would prove nothing"
            )


def _random_like_inputs(args: tuple, kwargs: dict, generator: torch.Generator) -> tuple[tuple, dict]:
    """Random floating inputs with the example's shapes, mean and spread; other inputs are kept."""

    def draw(v: Any) -> Any:
        if not (isinstance(v, Tensor) and v.is_floating_point()):
            return v
        std = float(v.std()) if v.numel() > 1 else 0.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float64)
        return (noise * std + float(v.mean())).to(v.dtype)

    return tuple(tree_map(draw, list(args))), tree_map(draw, kwargs)


# ====================================================================================== the work copy
_NOT_WEIGHT = re.compile(r"(table|pos|token|bias|gamma|scale|embed|ls\d?$|alpha|beta)", re.I)


def _exercise(state: Mapping[str, Tensor], generator: torch.Generator, strength: float) -> dict[str, Tensor]:
    """Randomised copies of the floating entries, for the check only.

    Weight matrices keep their scale (so activations keep theirs) plus 20% noise. Everything else (biases,
    norm affines, layer scales, bias tables, positional embeddings, BatchNorm means) gets noise of at least
    ``strength``: at initialisation these are constant or tiny and would hide a wrong permutation of what
    they touch. BatchNorm variances are scaled by a random positive factor."""
    out = dict(state)
    for key, v in state.items():
        if not (isinstance(v, Tensor) and v.is_floating_point()) or v.numel() == 0:
            continue
        # in place on the noise: no further temporaries of the size of the model (vgg11: 129M entries)
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v.dtype)
        rms = float(torch.linalg.vector_norm(v)) / math.sqrt(v.numel())
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            out[key] = noise.mul_(0.3).exp_().mul_(v)
        elif v.ndim >= 2 and not _NOT_WEIGHT.search(leaf) and rms > 0:
            out[key] = noise.mul_(0.2 * rms).add_(v)
        else:
            out[key] = noise.mul_(max(0.2 * rms, strength)).add_(v)
    return out


@contextmanager
def _tf32_off() -> Any:
    """TF32 off for a float32 check on CUDA, the user's flags restored afterwards."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _work_copy(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """A copy of ``model`` in ``dtype`` on ``device``, in eval mode. Parameters are copied straight to the
    target so a GPU model is not duplicated on the GPU first."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        moved = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    work = copy.deepcopy(model, memo)
    return work.eval()


class _Float64GroupedConvs(TorchFunctionMode):
    """Grouped and depthwise ``conv1d`` / ``conv2d`` in float64 on the CPU through ``unfold`` + a batched
    matmul: PyTorch's own CPU kernels for them are naive loops in float64 (a depthwise 3x3 conv on a
    2x256x16x16 input takes ~12 s instead of ~0.1 s in float32), which made the float64 check of MaxViT /
    EfficientNet-style models take minutes. Same sums, reordered: only round-off changes."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.conv2d, F.conv1d):
            out = _grouped_conv(func is F.conv1d, *args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def _pair(v: Any, one_d: bool, fill: int) -> tuple[int, int] | None:
    """A conv argument as (height, width); a 1-d conv gets a dummy height of ``fill``."""
    if isinstance(v, int):
        return (fill, v) if one_d else (v, v)
    if isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v) and len(v) == (1 if one_d else 2):
        return (fill, v[0]) if one_d else (v[0], v[1])
    return None


def _grouped_conv(
    one_d: bool,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor | None:
    """``F.conv{1,2}d`` for float64 CPU grouped convolutions, or None to use PyTorch's kernel."""
    if groups == 1 or x.dtype != torch.float64 or x.device.type != "cpu" or x.ndim != (3 if one_d else 4):
        return None
    st, pd, dl = _pair(stride, one_d, 1), _pair(padding, one_d, 0), _pair(dilation, one_d, 1)
    if st is None or pd is None or dl is None:
        return None  # e.g. padding="same": leave it to PyTorch
    if one_d:
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
    b, c, h, w = x.shape
    c_out, c_g, kh, kw = weight.shape
    h_out = (h + 2 * pd[0] - dl[0] * (kh - 1) - 1) // st[0] + 1
    w_out = (w + 2 * pd[1] - dl[1] * (kw - 1) - 1) // st[1] + 1
    if c != c_g * groups or c_out % groups or h_out <= 0 or w_out <= 0:
        return None  # let PyTorch raise its own error
    patches = F.unfold(x, (kh, kw), dilation=dl, padding=pd, stride=st)  # (b, c * kh * kw, L), c outermost
    patches = patches.view(b, groups, c_g * kh * kw, h_out * w_out)
    out = torch.matmul(weight.reshape(groups, c_out // groups, c_g * kh * kw), patches)  # (b, g, o, L)
    out = out.reshape(b, c_out, h_out, w_out)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.squeeze(2) if one_d else out


# ====================================================================================== comparison
def _float_leaves(out: Any) -> list[Tensor]:
    return [
        x for x in tree_leaves(out) if isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())
    ]


def _outputs_error(a: Any, b: Any) -> float:
    """``max |a - b| / max |a|`` over the floating outputs (inf when they differ in structure or b is not
    finite: NaN must never compare as "no difference")."""
    la, lb = _float_leaves(a), _float_leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        return math.inf
    err = 0.0
    for x, y in zip(la, lb):
        if x.numel() == 0:
            continue
        scale = float(x.detach().abs().max())
        diff = float((x.detach() - y.detach()).abs().max())
        if not math.isfinite(diff):
            return math.inf
        err = max(err, diff / max(scale, 1e-300))
    return err


def aliases(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict keys that are one tensor in ``model``: tied weights, a buffer registered in two
    modules, a parametrization's ``original`` shared by two modules.

    Such keys can only ever hold one value, so a spec must move them the same way.

    Example:
        >>> from torch import nn
        >>> emb, out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> out.weight = emb.weight
        >>> aliases(nn.ModuleDict({"emb": emb, "out": out}))
        [['emb.weight', 'out.weight']]
    """
    found: dict[tuple, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, Tensor) or t.numel() == 0 or t.device.type == "meta":
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0:
            continue
        found.setdefault((t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride()), []).append(key)
    return [keys for keys in found.values() if len(keys) > 1]


def _derangement_like(n: int, generator: torch.Generator) -> Tensor:
    perm = torch.randperm(n, generator=generator)
    if n > 1 and torch.equal(perm, torch.arange(n)):
        perm = perm.roll(1)
    return perm


class _Checker:
    """The model's reference outputs on a few inputs, and the error of any subset of permuted groups."""

    def __init__(
        self,
        model: nn.Module,
        spec: PermutationSpec,
        inputs: list[tuple[tuple, dict]],
        generator: torch.Generator,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.tf32_off = dtype == torch.float32 and torch.device(device).type == "cuda"
        self.work = _work_copy(model, dtype, device)  # ties survive the copy (deepcopy's memo)
        # the check runs the model as it is tied: aliases get one randomised value, and a permutation that
        # would give them two cannot be realised by the model (see ``error``)
        self.aliases = aliases(self.work)
        self.split: set[tuple[str, ...]] = set()  # alias groups some checked permutation moved apart
        state = {k: v.detach() for k, v in self.work.state_dict(keep_vars=True).items()}
        self.inputs = [self._cast(a, k) for a, k in inputs]
        # Strong randomisation first; a milder one when it drives the model to inf / NaN (e.g. exp of a
        # randomised log-scale).
        for strength in (0.5, 0.05, 0.0):
            self.state = self._tie(_exercise(state, generator, strength)) if strength else state
            self.refs = [self.run(self.state, a, k) for a, k in self.inputs]
            if all(self._usable(r) for r in self.refs):
                break
        else:
            raise ValueError(
                f"{type(model).__name__} returns no finite, non-empty floating output on example_inputs: "
                "there is nothing to compare a permuted model against"
            )

    def _tie(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        for keys in self.aliases:
            for key in keys[1:]:
                state[key] = state[keys[0]]
        return state

    def _cast(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def cast(v: Any) -> Any:
            if isinstance(v, Tensor):
                v = v.detach().to(self.device)
                return v.to(self.dtype) if v.is_floating_point() else v
            return v

        return tuple(tree_map(cast, list(args))), tree_map(cast, kwargs)

    @staticmethod
    def _usable(out: Any) -> bool:
        leaves = _float_leaves(out)
        return bool(leaves) and all(x.numel() > 0 and bool(torch.isfinite(x).all()) for x in leaves)

    def run(self, state: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Any:
        fast_convs = self.dtype == torch.float64 and torch.device(self.device).type == "cpu"
        grouped = _Float64GroupedConvs() if fast_convs else nullcontext()
        tf32 = _tf32_off() if self.tf32_off else nullcontext()
        with torch.no_grad(), tf32, grouped:
            return functional_call(self.work, dict(state), args, kwargs, tie_weights=False, strict=False)

    def roundoff(self, generator: torch.Generator, repeats: int = 2) -> float:
        """The model's own round-off: the error when every floating parameter and buffer is moved by about
        one unit in the last place (no permutation), the largest over ``repeats`` draws. A permutation
        reorders sums, which perturbs every layer's result at that level too."""
        eps = torch.finfo(self.dtype).eps
        worst = 0.0
        for _ in range(repeats):
            nudged = {}
            for key, v in self.state.items():
                if isinstance(v, Tensor) and v.is_floating_point() and v.numel():
                    u = torch.rand(v.shape, generator=generator, dtype=torch.float64).to(v.device, v.dtype)
                    nudged[key] = v * (1 + eps * (2 * u - 1))
                else:
                    nudged[key] = v
            for ref, (args, kwargs) in zip(self.refs, self.inputs):
                worst = max(worst, _outputs_error(ref, self.run(nudged, args, kwargs)))
        return worst

    def error(self, perms: Mapping[str, Tensor], rtol: float = math.inf) -> float:
        """The largest relative error over the inputs (stops early once it exceeds ``rtol``)."""
        permuted = permute_state_dict(self.state, self.spec, perms)
        split = [tuple(keys) for keys in self.aliases if not _all_equal([permuted[k] for k in keys])]
        if split:  # one tensor in the model cannot take two values
            self.split.update(split)
            return math.inf
        err = 0.0
        for ref, (args, kwargs) in zip(self.refs, self.inputs):
            err = max(err, _outputs_error(ref, self.run(permuted, args, kwargs)))
            if err > rtol:
                break
        return err


def _all_equal(values: list[Tensor]) -> bool:
    return all(v is values[0] or torch.equal(v, values[0]) for v in values[1:])


def _bisect(
    chosen: list[str], err_all: float, error: Callable[[list[str]], float], rtol: float
) -> dict[str, float]:
    """The culprit groups: halve the failing set until single groups remain (a few checks per culprit
    instead of one per group). A set whose halves both pass fails only in combination: blame all of it."""
    if len(chosen) == 1:
        return {chosen[0]: err_all}
    mid = len(chosen) // 2
    failing: dict[str, float] = {}
    for half in (chosen[:mid], chosen[mid:]):
        e = error(half)
        if e > rtol:
            failing.update(_bisect(half, e, error, rtol))
    return failing or dict.fromkeys(chosen, err_all)


# ====================================================================================== public API
def check_spec(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    *,
    rtol: float | None = None,
    seed: int | torch.Generator | None = None,
    groups: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float64,
    n_inputs: int = 3,
) -> float:
    """Verify that permuting by ``spec`` does not change what ``model`` computes, at round-off level.

    A float64 CPU copy of the model (eval mode) with freshly randomised biases, norm affines, layer scales,
    bias tables and BatchNorm statistics is compared with its permutation under one random permutation per
    group (never the identity), on the example and ``n_inputs - 1`` random inputs of the same shape. The
    model itself is not modified, whatever its device or dtype.

    Args:
        model: the model the spec is for.
        spec: the spec to verify (sizes filled in).
        example_inputs: a Tensor, a tuple of positional inputs or a dict of keyword inputs. Floating inputs
            must be non-empty and finite.
        rtol: allowed ``max |out - out_perm| / max |out|``; default :data:`DEFAULT_RTOL` of ``dtype``
            (1e-9 in float64, near round-off), raised to :data:`ROUNDOFF_FACTOR` times the model's own
            measured round-off where that is larger (deep, badly conditioned nets), at most
            :data:`MAX_RTOL` (5e-8 in float64).
        seed: an int or a ``torch.Generator`` for the permutations, the randomised parameters and the
            random inputs (default: a fixed seed).
        groups: check only these groups (default: all).
        dtype: the working precision (float64; float32 only where float64 cannot run).
        n_inputs: how many inputs to compare on (the example plus random ones).

    Returns:
        The achieved relative error (every checked group permuted at once).

    Raises:
        SpecCheckError: the error exceeds ``rtol``; the failing set is bisected and ``.failing`` names the
            culprit groups with their errors.
        ValueError: an input has no rows or is not finite, or the model's outputs are not finite.

    Example:
        >>> import torch
        >>> from rebasin_callbacks import check_spec, trace_spec
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> x = torch.randn(4, 2)
        >>> check_spec(mlp, trace_spec(mlp, x, check=False), x) < 1e-12
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
    gen = as_generator(seed) or torch.Generator().manual_seed(0)
    chosen = list(spec.groups if groups is None else groups)
    unknown = [g for g in chosen if g not in spec.sizes]
    if unknown:
        raise SpecMismatchError(f"groups {unknown[:5]} are not in the spec (or have no size)")
    args, kwargs = normalize_inputs(example_inputs)
    validate_inputs(args, kwargs)
    spec.validate({k: v for k, v in model.state_dict(keep_vars=True).items()})
    inputs = [(args, kwargs)] + [_random_like_inputs(args, kwargs, gen) for _ in range(n_inputs - 1)]
    perms = {g: _derangement_like(spec.sizes[g], gen) for g in chosen}
    if not chosen:
        return 0.0
    checker, work_dtype = _make_checker(model, spec, inputs, gen, dtype)
    tol = rtol if rtol is not None else DEFAULT_RTOL.get(work_dtype, 1e-4)

    def error(subset: list[str]) -> float:
        return checker.error({g: perms[g] for g in subset}, tol)

    err = error(chosen)
    if err <= tol:
        return err
    roundoff = None
    if rtol is None:  # above the default: is it this model's own round-off? (a control run decides)
        roundoff = checker.roundoff(gen)
        tol = min(max(tol, ROUNDOFF_FACTOR * roundoff), MAX_RTOL.get(work_dtype, tol))
        if err <= tol:
            return err
    noise = f"; the model's own round-off is {roundoff:.2g}" if roundoff is not None else ""
    failing = _bisect(chosen, err, error, tol)
    shown = ", ".join(f"{g} ({e:.3g})" for g, e in list(failing.items())[:10])
    more = f" and {len(failing) - 10} more" if len(failing) > 10 else ""
    tied = "; ".join(" / ".join(repr(k) for k in keys) for keys in sorted(checker.split))
    tied = f"; tied entries (one tensor in the model) moved differently: {tied}" if tied else ""
    raise SpecCheckError(
        f"the spec changes the outputs of {type(model).__name__} (relative error {err:.3g} > rtol={tol:g} in "
        f"{str(work_dtype).replace('torch.', '')}{noise}); failing groups: {shown}{more}{tied}",
        failing,
        error=err,
        rtol=tol,
        dtype=work_dtype,
        roundoff=roundoff,
    )


def _make_checker(
    model: nn.Module,
    spec: PermutationSpec,
    inputs: list[tuple[tuple, dict]],
    gen: torch.Generator,
    dtype: torch.dtype,
) -> tuple[_Checker, torch.dtype]:
    """The float64 CPU checker; where the model cannot run in float64 (e.g. a tensor attribute that is not
    a registered buffer), a float32 one on the model's device with TF32 off, with a warning."""
    state = gen.get_state()
    try:
        return _Checker(model, spec, inputs, gen, dtype, "cpu"), dtype
    except (ValueError, SpecMismatchError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the float64 copy: fall back, say so
        if dtype == torch.float32:
            raise
        gen.set_state(state)
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        warnings.warn(
            f"check_spec({type(model).__name__}): cannot run a {dtype} CPU copy "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); checking in float32 "
            f"on {device} with TF32 off, tolerance {DEFAULT_RTOL[torch.float32]:g}",
            stacklevel=3,
        )
        return _Checker(model, spec, inputs, gen, torch.float32, device), torch.float32
