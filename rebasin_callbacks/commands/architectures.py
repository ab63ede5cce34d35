"""Architectures by name: ``--arch`` built into a model, its stem's channels changed, its head size and stem
read from a checkpoint, and the input shape it expects.

An architecture is named ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``),
``torchvision:NAME`` (``torchvision.models.get_model(NAME, weights=None)``), ``module.path:factory`` or
``path/to/file.py:factory`` (any callable returning an ``nn.Module``; ``--num-classes`` is passed to it as
``num_classes=`` when given). Nothing is downloaded: weights come from the checkpoints only. For timm and
torchvision architectures the head size and the stem's input channels are read from the checkpoint
(:func:`infer_arch_options`) unless ``--num-classes`` / ``--in-chans`` say otherwise.

Example:
    >>> model = build_model("torchvision:resnet18", num_classes=10, in_chans=1)
    >>> default_input_shape(model, "torchvision:resnet18")
    (1, 224, 224)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rebasin_callbacks.commands.arguments import check_arch
from rebasin_callbacks.commands.errors import CommandError

if TYPE_CHECKING:  # torch is imported inside the functions: `rebasin --help` must not wait for it
    from torch import Tensor, nn

__all__ = ["build_model", "infer_arch_options", "default_input_shape", "stem_channels"]


def _import_factory(target: str, arch: str) -> Callable[..., Any]:
    module_name, _, attr = target.rpartition(":")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise CommandError(f"--arch {arch}: no such file {module_name!r}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current folder
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"--arch {arch}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CommandError(f"--arch {arch}: {module_name!r} has no callable {attr!r}")
    return factory


def build_model(arch: str, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (no pretrained weights are downloaded).

    ``in_chans`` changes the stem's input channels: timm's ``in_chans=``; for torchvision the first
    convolution is replaced by one with that many input channels; other factories get ``in_chans=``.

    Raises:
        CommandError: unknown architecture, missing optional package, or a factory that fails.
    """
    from torch import nn

    kind, name = check_arch(arch)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise CommandError(
                "--arch timm:...: timm is not installed (pip install 'rebasin-callbacks[timm]')"
            ) from None
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise CommandError(f"--arch {arch}: {exc}") from None
    elif kind == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise CommandError("--arch torchvision:...: torchvision is not installed") from None
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except (ValueError, KeyError) as exc:
            raise CommandError(f"--arch {arch}: unknown torchvision model ({exc})") from None
        if in_chans is not None:
            _set_stem_channels(model, in_chans, arch)
    else:
        factory = _import_factory(arch, arch)
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise CommandError(f"--arch {arch}: calling the factory failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise CommandError(f"--arch {arch}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _stem_key(model: nn.Module) -> str | None:
    """The state key of the first convolution's weight (4-D), the stem."""
    return next((k for k, v in model.state_dict().items() if v.ndim == 4), None)


def stem_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first convolution (its stem), ``None`` without one."""
    key = _stem_key(model)
    return None if key is None else int(model.state_dict()[key].shape[1])


def _set_stem_channels(model: nn.Module, in_chans: int, arch: str) -> None:
    from torch import nn

    key = _stem_key(model)
    if key is None:
        raise CommandError(f"--arch {arch} has no convolution stem: --in-chans does not apply")
    name = key.rpartition(".")[0]
    conv = model.get_submodule(name)
    if conv.in_channels == in_chans:
        return
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise CommandError(f"--arch {arch}: cannot change the input channels of its stem {name!r}")
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode)  # type: ignore[arg-type]  # fmt: skip
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _head_key(model: nn.Module, arch: str) -> str | None:
    """The state key of the classifier's weight: timm's ``get_classifier()``, else the last weight whose
    first dimension is the default head size (1000 for torchvision)."""
    state = model.state_dict()
    get_classifier = getattr(model, "get_classifier", None)
    if arch.startswith("timm:") and callable(get_classifier):
        head = get_classifier()
        names = {id(p): n for n, p in model.named_parameters()}
        weight = getattr(head, "weight", None)
        if weight is not None and id(weight) in names and weight.ndim >= 2:
            return names[id(weight)]
    classes = getattr(model, "num_classes", None) or 1000
    keys = [k for k, v in state.items() if v.ndim >= 2 and v.shape[0] == classes and k.endswith("weight")]
    return keys[-1] if keys else None


def _lookup(state: Mapping[str, Tensor], key: str, submodule: str | None) -> tuple[str, Tensor] | None:
    """The checkpoint entry for a model key, with or without a prefix (``model.fc.weight``); ``None`` when
    absent or ambiguous (loading then names the problem)."""
    if submodule:
        full = f"{submodule.rstrip('.')}.{key}"
        return (full, state[full]) if full in state else None
    if key in state:
        return key, state[key]
    hits = [r for r in state if r.endswith("." + key)]
    return (hits[0], state[hits[0]]) if len(hits) == 1 else None


def infer_arch_options(
    arch: str, state: Mapping[str, Tensor], *, submodule: str | None = None
) -> tuple[dict[str, int], list[str]]:
    """Head size and stem channels of a ``timm:`` / ``torchvision:`` architecture, read from a checkpoint.

    Returns ``({"num_classes": n, "in_chans": c}, notes)``, with only what differs from the architecture's
    defaults, and one note per value read (differing or not) naming the entry it was read from. Other architectures: ``{}``.

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> infer_arch_options("torchvision:resnet18", net.state_dict())[0]
        {'num_classes': 10}
    """
    if not arch.startswith(("timm:", "torchvision:")):
        return {}, []
    default = build_model(arch)
    own = default.state_dict()
    found: dict[str, int] = {}
    notes: list[str] = []
    head = _head_key(default, arch)
    entry = _lookup(state, head, submodule) if head else None
    if head and entry is not None:
        key, value = entry
        if value.ndim == own[head].ndim and tuple(value.shape[1:]) == tuple(own[head].shape[1:]):
            if value.shape[0] != own[head].shape[0]:
                found["num_classes"] = int(value.shape[0])
            notes.append(f"num_classes={value.shape[0]} (from {key!r} {tuple(value.shape)})")
    stem = _stem_key(default)
    entry = _lookup(state, stem, submodule) if stem else None
    if stem and entry is not None:
        key, value = entry
        if value.ndim == 4 and value.shape[0] == own[stem].shape[0]:
            if value.shape[1] != own[stem].shape[1]:
                found["in_chans"] = int(value.shape[1])
            notes.append(f"in_chans={value.shape[1]} (from {key!r} {tuple(value.shape)})")
    return found, notes


def default_input_shape(model: nn.Module, arch: str) -> tuple[int, ...] | None:
    """The input shape a model expects, when it says so (timm's cfg, ``example_input_array``)."""
    from torch import Tensor

    example = getattr(model, "example_input_array", None)
    if isinstance(example, Tensor) and example.dim() >= 1:
        return tuple(example.shape[1:])
    shape: tuple[int, ...] | None = None
    if arch.startswith("timm:"):
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if "input_size" in cfg:
            shape = tuple(int(s) for s in cfg["input_size"])
    if arch.startswith("torchvision:"):
        shape = (3, 224, 224)
    if shape is not None and len(shape) == 3:  # the stem may have been built for other channels
        key = _stem_key(model)
        if key is not None:
            shape = (int(model.state_dict()[key].shape[1]), *shape[1:])
    return shape
