"""``rebasin align``: permute model A's hidden units into model B's basin and save the result.

Model A is permuted (Sinkhorn re-basin, :func:`~rebasin_callbacks.align`: a weight-matching warm start
refined by Sinkhorn on the chosen cost); the saved state dict computes exactly what A computes (checked on a
random batch) but its weights lie close to B's, so interpolating it with B works (see ``rebasin lmc``).

``--steps 0`` is weight matching only (seconds, no refinement). The head size and the stem's input channels
of ``timm:`` / ``torchvision:`` architectures are read from MODEL_A (printed; ``--num-classes`` /
``--in-chans`` override). Output paths are checked before any work (never an input, never a directory, a
writable folder) and written atomically; nothing is written when the result would not compute what A
computes.

The input shape is printed (``--input-shape``, else the architecture's default, or with ``--data`` the
data's own image size). The checkpoint's dtype is kept (float64, float16, bfloat16). ``--out`` is a plain
state dict, ``--perms`` the permutations ``{group: LongTensor}``, ``--json`` a summary (distances, cost
history, input shape, dtype, seconds; strict JSON).

Exit status: 0 on success, 2 for a missing / unreadable file, NaN or infinite weights, a malformed
``--spec``, a ``--submodule`` the checkpoint lacks or a bad option, 3 when a checkpoint does not fit the
architecture (the first mismatching key and shapes are named).

Example:
    $ rebasin align a.pt b.pt --arch torchvision:resnet18 --out a_aligned.pt   # head size read from a.pt
    $ rebasin align a.pt b.pt --arch torchvision:resnet18 --input-shape 3 32 32 --steps 0 --out a_wm.pt
    $ rebasin align a.ckpt b.ckpt --arch mypackage.models:mlp --cost mid --data mnist --out a_aligned.pt
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from rebasin_callbacks.commands.common import (
    EXIT_MISMATCH,
    CommandError,
    add_align_arguments,
    add_data_arguments,
    add_model_arguments,
    align_kwargs,
    check_inputs,
    check_options,
    check_outputs,
    describe_shape,
    example_input,
    guarded,
    input_shape_and_source,
    load_models,
    load_spec,
    make_loader,
    say,
)

if TYPE_CHECKING:
    import torch

__all__ = ["add_arguments", "run", "l2_distance", "stop_reason", "function_tolerance"]

#: Largest ``max |out(A) - out(aligned)| / max |out(A)|`` accepted before saving (float32 round-off is
#: ~1e-6; CUDA's TF32 convolutions ~1e-3); a wrong spec gives errors of order 1.
FUNCTION_RTOL = {"cpu": 1e-3, "cuda": 1e-2}
#: The same for checkpoints in a half-precision dtype, whose own round-off is ~1e-3 (float16) / ~1e-2 (bfloat16).
HALF_RTOL = {"float16": 2e-2, "bfloat16": 1e-1}


def function_tolerance(device: torch.device, dtype: torch.dtype) -> float:
    """The largest relative output difference accepted between A and the aligned A, for a device and dtype.

    Example:
        >>> import torch
        >>> function_tolerance(torch.device("cpu"), torch.bfloat16)
        0.1
    """
    base = FUNCTION_RTOL["cuda" if device.type == "cuda" else "cpu"]
    return max(base, HALF_RTOL.get(str(dtype).removeprefix("torch."), 0.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``align`` subcommand's options."""
    add_model_arguments(parser)
    add_align_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--out", required=True, help="where to save the aligned model A (a plain state dict; never an input)"
    )
    parser.add_argument("--perms", default=None, help="also save the permutations {group: LongTensor} here")
    parser.add_argument(
        "--json", default=None, help="also write a summary (distances, cost history, seconds) as JSON here"
    )


def l2_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Euclidean distance between two models' floating-point state entries."""
    sb = b.state_dict()
    total = 0.0
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            total += float((v.double() - sb[k].double()).pow(2).sum())
    return math.sqrt(total)


def stop_reason(result: Any, max_steps: int) -> str:
    """Why the refinement ended, in words (``--steps 0``, early stop, or all steps run).

    Example:
        >>> from types import SimpleNamespace
        >>> stop_reason(SimpleNamespace(steps=0, history={}), 0)
        'weight matching only (--steps 0)'
        >>> stop_reason(SimpleNamespace(steps=2, history={"init_cost": [3.0], "best_cost": [2.0, 0.0]}), 9)
        'stopped after 2 of 9 steps: the cost reached its lower bound'
    """
    own = getattr(result, "stop_reason", None)
    if isinstance(own, str) and own:
        return own
    if max_steps == 0:
        return "weight matching only (--steps 0)"
    if result.steps == 0:
        return "the Sinkhorn refinement could not improve on the weight-matching warm start"
    if result.steps < max_steps:
        best = list(result.history.get("init_cost", [])) + list(result.history.get("best_cost", []))
        stale = 0
        while stale + 1 < len(best) and not best[-1 - stale] < best[-2 - stale]:
            stale += 1
        head = f"stopped after {result.steps} of {max_steps} steps"
        if stale == 0:
            return f"{head}: the cost reached its lower bound"
        steps = "step" if stale == 1 else f"{stale} steps"
        return (
            f"{head}: no better permutation in the last {steps} (early stopping: out of patience, or "
            "searching on would take longer than the weight-matching warm start did)"
        )
    return f"ran all {max_steps} steps (--steps)"


@guarded("align")
def run(args: argparse.Namespace) -> int:
    """Entry point of ``rebasin align``."""
    check_options(args)
    check_inputs(args)
    check_outputs(args, {"--out": args.out, "--perms": args.perms, "--json": args.json})
    import torch

    from rebasin_callbacks.align import align
    from rebasin_callbacks.checkpoints import save_state_dict
    from rebasin_callbacks.io import atomic_torch_save, atomic_write_json

    kwargs = align_kwargs(args)
    say(f"loading {args.model_a} and {args.model_b} as {args.arch}")
    model_a, model_b = load_models(args)
    shape, source = input_shape_and_source(args, model_a)
    x = example_input(model_a, args.arch, shape)
    say(describe_shape(shape, source))
    say(f"reading the permutation spec {args.spec}" if args.spec else "tracing the permutation spec")
    spec = load_spec(args, model_a, x)
    device = x.device
    data = None
    if args.cost in ("mid", "rnd"):
        data = make_loader(args, shape, train=True, device=device, dtype=x.dtype)
        kwargs["loss_fn"] = torch.nn.functional.cross_entropy
    plan = (
        "weight matching only"
        if args.steps == 0
        else f"weight matching, then up to {args.steps} Sinkhorn steps"
    )
    say(
        f"aligning {args.model_a} to {args.model_b}: {len(spec)} groups, cost {args.cost}, {plan}, on {device}"
    )
    try:
        result = align(model_a, model_b, spec=spec, data=data, **kwargs)
    except ValueError as exc:  # e.g. model and reference disagree although both fit --arch
        raise CommandError(f"align failed: {exc}", EXIT_MISMATCH) from None
    say(f"refinement: {stop_reason(result, args.steps)}")

    with torch.no_grad():
        out_a, out_aligned = model_a(x), result.model(x)
    diff = float((out_a - out_aligned).abs().max() / out_a.abs().max().clamp_min(1e-12))
    tol = function_tolerance(device, x.dtype)
    if not diff <= tol:  # also catches NaN
        raise CommandError(
            f"the aligned model does not compute what {args.model_a} computes (max relative output difference "
            f"{diff:.3g} > {tol:g}): the spec is wrong for {args.arch}; nothing was written",
            EXIT_MISMATCH,
        )
    before, after = l2_distance(model_a, model_b), l2_distance(result.model, model_b)
    out = save_state_dict(result.model, args.out)
    if args.perms:
        atomic_torch_save({g: p.cpu() for g, p in result.perms.items()}, args.perms)
    summary = {
        "model_a": args.model_a,
        "model_b": args.model_b,
        "arch": args.arch,
        "num_classes": args.num_classes,
        "in_chans": getattr(args, "in_chans", None),
        "input_shape": list(shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "groups": len(spec),
        "cost": args.cost,
        "steps": result.steps,
        "stop_reason": stop_reason(result, args.steps),
        "best_cost": result.cost,
        "l2_before": before,
        "l2_after": after,
        "function_rel_error": diff,
        "seconds": result.seconds,
        "out": str(out),
    }
    if args.json:
        atomic_write_json(args.json, {**summary, "history": result.history})
    print(
        f"L2 distance to B: {before:.4g} -> {after:.4g}  ({result.steps} Sinkhorn steps, {result.seconds:.1f} s)"
    )
    print(f"same function as A: max relative output difference {diff:.2g}")
    print(f"saved: {out}")
    return 0
