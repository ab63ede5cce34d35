"""Small helpers every module of the package may use: batches and devices, train/eval modes, state dicts.

This is the bottom layer: it imports nothing of the package except the leaf :mod:`rebasin_callbacks.spec`
(for its error type), so any module can import it without a cycle.

* batches: :func:`to_device`, :func:`split_batch`, :func:`take_batches`;
* modules: :func:`module_device`, :func:`module_dtype`, :func:`follow`, :func:`eval_mode`, :func:`train_mode`;
* state dicts: :func:`check_compatible`, :func:`check_finite`, :func:`l2_distance`, :func:`interpolate_state`;
* threads: :func:`thread_limit` (caps torch's intra-op threads inside heavy calls);
* the public vocabulary: :func:`as_generator` (``seed`` as an int or a generator).

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

import contextlib
import copy
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from rebasin_callbacks.spec import SpecMismatchError

__all__ = [
    "to_device",
    "split_batch",
    "take_batches",
    "module_device",
    "module_dtype",
    "follow",
    "eval_mode",
    "train_mode",
    "check_compatible",
    "check_finite",
    "l2_distance",
    "interpolate_state",
    "infer_example_inputs",
    "thread_limit",
    "default_threads",
    "as_generator",
    "SpecMismatchError",
]


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


#: dict keys recognised as a batch's inputs and targets by :func:`split_batch` (first match wins)
INPUT_KEYS: tuple[str, ...] = ("inputs", "input", "x", "image", "images", "pixel_values", "features", "data")
TARGET_KEYS: tuple[str, ...] = ("targets", "target", "y", "label", "labels")


# ------------------------------------------------------------------------------------------ batches
def to_device(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``batch`` with every tensor moved to ``device``, inside (nested) tuples, lists, dicts and namedtuples.

    With ``dtype``, floating-point tensors are also cast to it (integer targets keep their dtype). Other
    objects are returned as they are; the input containers are not modified.

    Example:
        >>> import torch
        >>> out = to_device((torch.ones(2), {"y": torch.tensor([1])}), "cpu", dtype=torch.float64)
        >>> out[0].dtype, out[1]["y"].dtype
        (torch.float64, torch.int64)
    """
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    if isinstance(batch, Mapping):
        items = {k: to_device(v, device, dtype) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:  # a Mapping type that cannot be built from a dict
            return items
    return batch


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch; ``targets`` is ``None`` when the batch has none.

    Accepted: a tensor (inputs only); a tuple/list ``(inputs, targets, ...)`` (extra items ignored); a
    mapping with an input key (one of :data:`INPUT_KEYS`, e.g. ``"x"``, ``"image"``) and optionally a target
    key (:data:`TARGET_KEYS`, e.g. ``"y"``, ``"label"``).

    Example:
        >>> import torch
        >>> x, y = split_batch({"image": torch.zeros(2, 3), "label": torch.tensor([0, 1])})
        >>> tuple(x.shape), y.tolist()
        ((2, 3), [0, 1])
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        x_key = next((k for k in INPUT_KEYS if k in batch), None)
        y_key = next((k for k in TARGET_KEYS if k in batch), None)
        if x_key is None:
            raise TypeError(
                f"a dict batch needs an input key (one of {list(INPUT_KEYS)}); got keys {list(batch)[:8]}. "
                "Pass a callable evaluate / a dataloader yielding (inputs, targets) for other formats"
            )
        return batch[x_key], (batch[y_key] if y_key is not None else None)
    raise TypeError(
        f"a batch must be a tensor, an (inputs, targets) tuple/list or a dict with input/target keys, got "
        f"{type(batch).__name__}"
    )


def take_batches(
    data: Iterable[Any] | Tensor,
    n: int | None,
    device: torch.device | str,
    what: str = "data",
    *,
    dtype: torch.dtype | None = None,
) -> list[Any]:
    """The first ``n`` batches of ``data`` (all when ``None``), moved to ``device`` (and float ``dtype``).

    A bare tensor is one batch. Raises a ValueError naming ``what`` when ``n < 1`` or no batch comes.

    Example:
        >>> import torch
        >>> len(take_batches([torch.ones(2)] * 5, 3, "cpu"))
        3
    """
    if isinstance(data, Tensor):
        data = [data]
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"{what}: the number of batches must be an int >= 1 or None, got {n!r}")
    out = []
    for i, batch in enumerate(data):
        if n is not None and i >= n:
            break
        out.append(to_device(batch, device, dtype))
    if not out:
        raise ValueError(f"{what}: the data yielded no batches")
    return out


# ------------------------------------------------------------------------------------------ modules
def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else first buffer; CPU for a module with neither).

    Example:
        >>> import torch
        >>> module_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (else buffer; else torch's default dtype).

    Example:
        >>> import torch
        >>> module_dtype(torch.nn.Linear(2, 2).double())
        torch.float64
    """
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def follow(model: nn.Module, leader: nn.Module) -> nn.Module:
    """``model`` on ``leader``'s device and dtype: ``model`` itself when it is there already, else a copy.

    The functions that combine two models compute where the first one lives; the second is copied and
    moved, never mutated.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2).double(), torch.nn.Linear(2, 2)
        >>> follow(b, a).weight.dtype, b.weight.dtype
        (torch.float64, torch.float32)
    """
    device, dtype = module_device(leader), module_dtype(leader)
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device and (not t.is_floating_point() or t.dtype == dtype) for t in tensors):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


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


# ------------------------------------------------------------------------------------------ state dicts
def _state(x: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    return x.state_dict() if isinstance(x, nn.Module) else x


def check_compatible(
    a: nn.Module | Mapping[str, Tensor],
    b: nn.Module | Mapping[str, Tensor],
    *,
    names: tuple[str, str] = ("the model", "the reference"),
) -> None:
    """Raise :class:`~rebasin_callbacks.SpecMismatchError` at the first entry where ``a`` and ``b`` differ.

    Same keys (a key missing on either side is named) and same shapes (the key, the first differing axis
    and both shapes are named). Devices and dtypes may differ: the functions that combine two models move
    and cast the second to the first. ``names`` says what ``a`` and ``b`` are in the message.

    Example:
        >>> import torch
        >>> check_compatible(torch.nn.Linear(2, 3), torch.nn.Linear(2, 3))  # same architecture: no error
        >>> try:
        ...     check_compatible(torch.nn.Linear(2, 3), torch.nn.Linear(2, 4))
        ... except ValueError as err:
        ...     print(err)
        'weight' axis 0 has size 3 in the model but 4 in the reference (shapes (3, 2) vs (4, 2))
    """
    sa, sb = _state(a), _state(b)
    na, nb = names
    missing_b = [k for k in sa if k not in sb]
    missing_a = [k for k in sb if k not in sa]
    if missing_b or missing_a:
        key = (missing_b or missing_a)[0]
        has, lacks = (na, nb) if missing_b else (nb, na)
        shape = tuple((sa if missing_b else sb)[key].shape)
        raise SpecMismatchError(
            f"different architectures: {has} has {key!r} {shape} but {lacks} does not "
            f"({len(missing_b)} keys only in {na}, {len(missing_a)} only in {nb})"
        )
    for key, ta in sa.items():
        shape_a, shape_b = tuple(ta.shape), tuple(sb[key].shape)
        if shape_a == shape_b:
            continue
        if len(shape_a) != len(shape_b):
            raise SpecMismatchError(
                f"{key!r} has {len(shape_a)} axes in {na} but {len(shape_b)} in {nb} "
                f"(shapes {shape_a} vs {shape_b})"
            )
        axis = next(i for i, (x, y) in enumerate(zip(shape_a, shape_b)) if x != y)
        raise SpecMismatchError(
            f"{key!r} axis {axis} has size {shape_a[axis]} in {na} but {shape_b[axis]} in {nb} "
            f"(shapes {shape_a} vs {shape_b})"
        )


def check_finite(state: nn.Module | Mapping[str, Tensor], name: str = "the model") -> None:
    """Raise a ValueError naming the first floating-point entry of ``state`` that holds NaN or inf.

    Example:
        >>> import torch
        >>> try:
        ...     check_finite({"w": torch.tensor([1.0, float("nan")])}, "the reference")
        ... except ValueError as err:
        ...     print(err)
        the reference: 'w' holds 1 NaN/inf value(s) of 2
    """
    for key, t in _state(state).items():
        if t.is_floating_point() or t.is_complex():
            if bool(torch.isfinite(t.detach()).all()):  # one read-back per tensor when all is well
                continue
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                raise ValueError(f"{name}: {key!r} holds {bad} NaN/inf value(s) of {t.numel()}")


def l2_distance(a: nn.Module | Mapping[str, Tensor], b: nn.Module | Mapping[str, Tensor]) -> float:
    """Euclidean distance between two models' weights: ``sqrt(sum ||a[k] - b[k]||^2)``.

    Which entries count: for modules, their **floating-point parameters** only (not buffers: BatchNorm
    running statistics are not weights that re-basin aligns); for state dicts, every floating-point entry
    given (pass ``dict(model.named_parameters())`` to get the parameters-only figure). Integer entries are
    skipped. Summed in float64 on ``a``'s device (``b`` is copied there), whatever the dtypes.

    Example:
        >>> import torch
        >>> l2_distance({"w": torch.zeros(2), "n": torch.tensor(3)}, {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(1)})
        5.0
    """
    if isinstance(a, nn.Module) != isinstance(b, nn.Module):
        raise TypeError("l2_distance: pass two modules or two state dicts, not one of each")
    sa = dict(a.named_parameters()) if isinstance(a, nn.Module) else a
    sb = dict(b.named_parameters()) if isinstance(b, nn.Module) else b
    total: Tensor | None = None
    for key, ta in sa.items():
        if not ta.is_floating_point():
            continue
        if key not in sb:
            raise SpecMismatchError(f"l2_distance: {key!r} is in the first model but not the second")
        diff = ta.detach().double() - sb[key].detach().to(ta.device, torch.float64)
        term = diff.pow(2).sum()
        total = term if total is None else total + term
    return 0.0 if total is None else math.sqrt(float(total))  # one host sync, at the end


def interpolate_state(
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    lam: float | Tensor,
    *,
    differentiable: bool = False,
) -> dict[str, Tensor]:
    """``(1 - lam) * a + lam * b`` for every floating-point entry; other entries are copied from ``a``.

    The result follows ``a``: its device and dtype (``b`` is moved and cast; half precision is
    interpolated in float32). ``lam = 0`` and ``lam = 1`` give ``a`` and ``b`` exactly. Inputs are not
    modified. Keys and shapes must match (:func:`check_compatible`). ``differentiable=True`` keeps ``a``'s
    autograd graph (and a tensor ``lam``'s): the costs on the line between a permuted view and its
    reference are trained through it; ``b`` is always treated as a constant.

    Example:
        >>> import torch
        >>> interpolate_state({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"].tolist()
        [0.25, 0.25]
    """
    check_compatible(state_a, state_b, names=("model_a", "model_b"))
    out = {}
    for key, ta in state_a.items():
        if not differentiable:
            ta = ta.detach()
        if not (ta.is_floating_point() or ta.is_complex()):
            out[key] = ta.detach().clone()  # counters such as num_batches_tracked: keep a's
            continue
        work = ta.float() if ta.dtype in (torch.float16, torch.bfloat16) else ta
        other = state_b[key].detach().to(device=work.device, dtype=work.dtype)
        # (1 - lam) * a + lam * b (not a + lam * (b - a)) so lam = 0 and 1 give a and b exactly
        out[key] = ((1.0 - lam) * work + lam * other).to(ta.dtype)
    return out


def infer_example_inputs(model: nn.Module, batch: int = 2) -> tuple[Tensor, str] | None:
    """Random inputs the model declares it takes, for tracing a spec when the user gave none, and a
    sentence saying where they came from; ``None`` when the model does not say.

    Two sources, both stated by the model itself: timm's ``pretrained_cfg["input_size"]`` (``(C, H, W)``),
    and a first layer that is an ``nn.Linear`` (its ``in_features``). A convolutional stem gives the
    channels but not the image size, so it is not guessed.

    Example:
        >>> import torch
        >>> x, why = infer_example_inputs(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU()))
        >>> tuple(x.shape), why
        ((2, 5), "the first layer's in_features (5)")
    """
    device, dtype = module_device(model), module_dtype(model)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and size and all(isinstance(v, int) and v > 0 for v in size):
        x = torch.randn(batch, *size, device=device, dtype=dtype)
        return x, f"timm's pretrained_cfg input_size {tuple(size)}"
    first = next(
        (m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters())), None
    )
    if isinstance(first, nn.Linear):
        x = torch.randn(batch, first.in_features, device=device, dtype=dtype)
        return x, f"the first layer's in_features ({first.in_features})"
    return None


# ------------------------------------------------------------------------------------------ threads
#: environment variable: the intra-op thread cap inside the library's heavy calls ("0" or "off" = no cap)
THREADS_ENV = "REBASIN_NUM_THREADS"


def default_threads() -> int | None:
    """The thread cap :func:`thread_limit` applies by default: ``$REBASIN_NUM_THREADS`` when set (``0`` /
    ``off`` = no cap), else 1 thread per 4 cores the process may use, at least 1 and at most 8.

    Example:
        >>> default_threads() is None or default_threads() >= 1
        True
    """
    env = os.environ.get(THREADS_ENV, "").strip().lower()
    if env in ("0", "off", "none"):
        return None
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be an integer or 'off', got {env!r}") from None
        if value < 0:
            raise ValueError(f"{THREADS_ENV} must be >= 0, got {value}")
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 4))


@contextlib.contextmanager
def thread_limit(n: int | None | str = "auto") -> Iterator[None]:
    """Cap torch's intra-op CPU threads to ``n`` inside the block and restore the previous count after.

    ``"auto"`` uses :func:`default_threads`; ``None`` changes nothing. Re-basin runs many small kernels:
    on a busy machine, torch's default (one thread per core) makes every kernel wait for the slowest core,
    which turns seconds into minutes, while a single thread barely slows an idle machine (BENCHMARKS.md).

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with thread_limit(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    limit = default_threads() if n == "auto" else n
    if isinstance(limit, str):
        raise ValueError(f"threads must be an int >= 1, None or 'auto', got {n!r}")
    before = torch.get_num_threads()
    if limit is None or limit >= before:
        yield
        return
    if limit < 1:
        raise ValueError(f"threads must be an int >= 1, None or 'auto', got {n!r}")
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(before)
