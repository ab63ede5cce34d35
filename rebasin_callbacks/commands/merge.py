"""``rebasin merge``: align N >= 2 checkpoints of one architecture into one basin and save their average.

Every model gets one permutation per group to model 1's frame (:func:`~rebasin_callbacks.merge`), so the
alignment is cycle-consistent; the merged model is the (weighted) average of the aligned models. Each aligned
model is checked to compute what its checkpoint computes (on a random batch) before anything is written.
Output paths are checked before any work (never an input, never a directory, a writable folder) and written
atomically; inputs are never written.

``--method data`` learns the permutations on the loss of the merged model on ``--data`` batches;
``--reset-bn`` / ``--repair`` fix the merged model's BatchNorm statistics on them. With ``--data`` the
models, the merged model and their ensemble are also evaluated on the test split.

Exit status: 0 on success, 2 for a missing / unreadable file or a bad option, 3 when a checkpoint does not
fit the architecture (the first mismatching key and shapes are named).

Example:
    $ rebasin merge a.pt b.pt c.pt --arch torchvision:resnet18 --input-shape 3 32 32 --out merged.pt
    $ rebasin merge a.pt b.pt c.pt --arch mypackage.models:mlp --method data --data mnist --out merged.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from rebasin_callbacks.commands.common import (
    EXIT_MISMATCH,
    CommandError,
    add_data_arguments,
    add_model_arguments,
    example_input,
    guarded,
    input_shape,
    load_spec,
    make_loader,
    say,
)

__all__ = ["add_arguments", "run", "METHODS"]

#: the methods of :func:`~rebasin_callbacks.merge` (kept here so that parsing does not import torch)
METHODS = ("naive", "star", "merge_many", "data_free", "data")
#: largest relative output difference accepted between a checkpoint and its aligned model (as ``align``)
FUNCTION_RTOL = {"cpu": 1e-3, "cuda": 1e-2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``merge`` subcommand's options."""
    parser.add_argument(
        "models", metavar="MODEL", nargs="+", help="checkpoints to merge (at least 2; state dicts or "
        "Lightning .ckpt files, read with weights_only=True); the first one sets the frame",
    )  # fmt: skip
    add_model_arguments(parser, checkpoints=0)
    parser.add_argument(
        "--submodule", default=None, metavar="NAME",
        help="in checkpoints holding several models of the architecture, the one to use (e.g. model)",
    )  # fmt: skip
    add_data_arguments(parser)
    parser.add_argument(
        "--method", choices=METHODS, default="data_free",
        help="naive (plain average), star (all matched to the first), merge_many (Git Re-Basin's MergeMany), "
        "data_free (MergeMany refined by Sinkhorn on the distance to the mean), data (refined on the merged "
        "model's loss on --data batches) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--weights", type=float, nargs="+", default=None, metavar="W",
        help="merge weights, one per model (default: equal)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=None,
        help="most Sinkhorn steps of data_free / data (default: 100 / 150; stops earlier without gains)",
    )  # fmt: skip
    parser.add_argument("--reset-bn", action="store_true", help="recompute the merged model's BatchNorm "
                        "statistics on --data batches")  # fmt: skip
    parser.add_argument("--repair", action="store_true", help="REPAIR the merged model on --data batches: every "
                        "unit gets the mean of the aligned models' statistics")  # fmt: skip
    parser.add_argument("--n-batches", type=int, default=10, help="batches for --reset-bn / --repair "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", required=True, help="where to save the merged model (a plain state dict)")
    parser.add_argument("--aligned-dir", default=None, metavar="DIR",
                        help="also save every aligned model here, as aligned_<i>.pt")  # fmt: skip
    parser.add_argument(
        "--perms", default=None, help="also save the permutations (a list, one dict per model)"
    )
    parser.add_argument("--json", default=None, help="also write a summary (method, times, metrics) here")


def _outputs(args: argparse.Namespace) -> dict[str, str | None]:
    out: dict[str, str | None] = {"--out": args.out, "--perms": args.perms, "--json": args.json}
    if args.aligned_dir:
        for i in range(len(args.models)):
            out[f"--aligned-dir (model {i + 1})"] = os.path.join(args.aligned_dir, f"aligned_{i}.pt")
    return out


def _check_args(args: argparse.Namespace) -> None:
    """Every option checked before torch is imported."""
    from rebasin_callbacks.io import OutputPathError, check_output_paths

    n = len(args.models)
    if n < 2:
        raise CommandError(f"merge needs at least 2 checkpoints, got {n}")
    for i, path in enumerate(args.models, 1):
        if not Path(path).is_file():
            raise CommandError(f"MODEL {i}: no such file: {path}")
    if args.method == "data" and args.data == "none":
        raise CommandError("--method data learns on the merged model's loss: add --data mnist (or digits)")
    for flag, on in (("--reset-bn", args.reset_bn), ("--repair", args.repair)):
        if on and args.data == "none":
            raise CommandError(f"{flag} needs batches: add --data mnist (or digits)")
    if args.weights is not None:
        if len(args.weights) != n:
            raise CommandError(f"--weights: {len(args.weights)} values for {n} models")
        if not all(math.isfinite(w) and w >= 0 for w in args.weights) or sum(args.weights) <= 0:
            raise CommandError(f"--weights must be finite, >= 0 and not all 0, got {args.weights}")
    if args.steps is not None and args.steps < 0:
        raise CommandError(f"--steps must be >= 0, got {args.steps}")
    if args.n_batches <= 0:
        raise CommandError(f"--n-batches must be > 0, got {args.n_batches}")
    if args.aligned_dir and not Path(args.aligned_dir).is_dir():
        raise CommandError(f"--aligned-dir: no such folder: {args.aligned_dir}")
    inputs: dict[str, str | None] = {f"MODEL {i}": p for i, p in enumerate(args.models, 1)}
    inputs["--spec"] = args.spec
    module = args.arch.rpartition(":")[0]
    if module.endswith(".py") or os.sep in module:
        inputs["--arch"] = module
    try:
        check_output_paths(_outputs(args), inputs)
    except OutputPathError as exc:
        raise CommandError(str(exc)) from None


def _load(args: argparse.Namespace) -> list[Any]:
    """Every checkpoint loaded strictly into ``--arch`` (head size / stem read from the first one)."""
    from rebasin_callbacks.commands.common import (
        build_model,
        infer_arch_options,
        load_checkpoint,
        read_checkpoint,
        resolve_device,
    )

    device = resolve_device(args.device)
    states = [read_checkpoint(p, f"MODEL {i}") for i, p in enumerate(args.models, 1)]
    if args.num_classes is None or args.in_chans is None:
        found, notes = infer_arch_options(args.arch, states[0], submodule=args.submodule)
        for name, value in found.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
        if notes:
            say(
                f"read from {args.models[0]}: "
                + ", ".join(notes)
                + " (override with --num-classes / --in-chans)"
            )
    models = []
    for i, (path, state) in enumerate(zip(args.models, states), 1):
        model = build_model(args.arch, args.num_classes, args.in_chans)
        load_checkpoint(model, state, args, path, f"MODEL {i}")
        models.append(model.to(device).eval())
    return models


@guarded("merge")
def run(args: argparse.Namespace) -> int:
    """Entry point of ``rebasin merge``."""
    _check_args(args)
    import torch

    from rebasin_callbacks.checkpoints import save_state_dict
    from rebasin_callbacks.io import atomic_torch_save, atomic_write_text
    from rebasin_callbacks.merge import merge

    n = len(args.models)
    say(f"loading {n} checkpoints as {args.arch}")
    models = _load(args)
    shape = input_shape(args, models[0])
    x = example_input(models[0], args.arch, shape)
    say(
        "reading the permutation spec" if args.spec else f"tracing the permutation spec (input {list(shape)})"
    )
    spec = load_spec(args, models[0], x)
    data = make_loader(args, shape, train=True, device=x.device)
    say(f"merging {n} models: {len(spec)} groups, method {args.method}, on {x.device}")
    try:
        result = merge(
            models, spec=spec, method=args.method, weights=args.weights, data=data,
            reset_bn=args.reset_bn, repair=args.repair, n_batches=args.n_batches, steps=args.steps,
            seed=args.seed, progress=not args.no_progress,
        )  # fmt: skip
    except ValueError as exc:  # e.g. checkpoints that fit --arch but not each other
        raise CommandError(f"merge failed: {exc}", EXIT_MISMATCH) from None
    say(f"aligned in {result.seconds:.1f} s; distance to the mean {result.history['distance'][0]:.4g} -> "
        f"{result.history['distance'][-1]:.4g}")  # fmt: skip

    tol = FUNCTION_RTOL["cuda" if x.device.type == "cuda" else "cpu"]
    errors = []
    with torch.no_grad():
        for i, (model, aligned) in enumerate(zip(models, result.models), 1):
            ref, out = model(x), aligned(x)
            diff = float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12))
            if not diff <= tol:  # also catches NaN
                raise CommandError(
                    f"the aligned model {i} does not compute what {args.models[i - 1]} computes (max relative "
                    f"output difference {diff:.3g} > {tol:g}): the spec is wrong for {args.arch}; nothing was "
                    "written",
                    EXIT_MISMATCH,
                )
            errors.append(diff)
    evaluation = None
    if args.data != "none":
        test = make_loader(args, shape, train=False, device=x.device)
        say("evaluating the models, the merged model and their ensemble on the test split")
        evaluation = result.evaluate(test)
    out = save_state_dict(result.merged, args.out)
    if args.aligned_dir:
        for i, aligned in enumerate(result.models):
            save_state_dict(aligned, os.path.join(args.aligned_dir, f"aligned_{i}.pt"))
    if args.perms:
        atomic_torch_save([{g: p.cpu() for g, p in perms.items()} for perms in result.perms], args.perms)
    summary = {
        "models": list(args.models),
        "arch": args.arch,
        "method": args.method,
        "weights": result.weights,
        "groups": len(spec),
        "distance_before": result.history["distance"][0],
        "distance_after": result.history["distance"][-1],
        "cycle_error": result.cycle_error() if n >= 3 else None,
        "function_rel_error": max(errors),
        "seconds": result.seconds,
        "evaluation": evaluation.to_dict() if evaluation is not None else None,
        "out": str(out),
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=1))
    if evaluation is not None:
        for i, m in enumerate(evaluation.models, 1):
            print(
                f"model {i}: loss {m['loss']:.4f}"
                + (f", accuracy {m['accuracy']:.4f}" if "accuracy" in m else "")
            )
        print(evaluation.summary())
    print(f"same function as every input: max relative output difference {max(errors):.2g}")
    print(f"saved: {out}")
    return 0
