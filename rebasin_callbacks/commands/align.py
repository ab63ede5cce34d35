"""``rebasin align``: permute model A's hidden units into model B's basin and save the result.

Model A is permuted (Sinkhorn re-basin, :func:`~rebasin_callbacks.align`: a weight-matching warm start
refined by Sinkhorn on the chosen cost); the saved state dict computes exactly what A computes (checked on a
random batch) but its weights lie close to B's, so interpolating it with B works (see ``rebasin lmc``).

Exit status: 0 on success, 2 for a missing / unreadable file or a bad option, 3 when a checkpoint does not
fit the architecture (the first mismatching key and shapes are named).

Example:
    $ rebasin align a.pt b.pt --arch torchvision:resnet18 --num-classes 10 --input-shape 3 32 32 --out a_aligned.pt
    $ rebasin align a.ckpt b.ckpt --arch mypackage.models:mlp --cost mid --data mnist --out a_aligned.pt
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from rebasin_callbacks.commands.common import (
    EXIT_MISMATCH,
    CommandError,
    add_align_arguments,
    add_data_arguments,
    add_model_arguments,
    align_kwargs,
    example_input,
    guarded,
    input_shape,
    load_models,
    load_spec,
    make_loader,
)

__all__ = ["add_arguments", "run", "l2_distance"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``align`` subcommand's options."""
    add_model_arguments(parser)
    add_align_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="where to save the aligned model A (a plain state dict)")
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


@guarded("align")
def run(args: argparse.Namespace) -> int:
    """Entry point of ``rebasin align``."""
    from rebasin_callbacks.align import align
    from rebasin_callbacks.checkpoints import save_state_dict

    kwargs = align_kwargs(args)
    if args.cost in ("mid", "rnd") and args.data == "none":
        raise CommandError(f"--cost {args.cost} needs data: add --data mnist (or digits)")
    model_a, model_b = load_models(args)
    shape = input_shape(args, model_a)
    x = example_input(model_a, args.arch, shape)
    spec = load_spec(args, model_a, x)
    device = x.device
    data = None
    if args.cost in ("mid", "rnd"):
        data = make_loader(args, shape, train=True, device=device)
        kwargs["loss_fn"] = torch.nn.functional.cross_entropy
    print(f"aligning {args.model_a} to {args.model_b}: {args.arch}, {len(spec)} groups, cost {args.cost}")
    try:
        result = align(model_a, model_b, spec=spec, data=data, **kwargs)
    except ValueError as exc:  # e.g. model and reference disagree although both fit --arch
        raise CommandError(f"align failed: {exc}", EXIT_MISMATCH) from None

    with torch.no_grad():
        out_a, out_aligned = model_a(x), result.model(x)
    diff = float((out_a - out_aligned).abs().max() / out_a.abs().max().clamp_min(1e-12))
    before, after = l2_distance(model_a, model_b), l2_distance(result.model, model_b)
    out = save_state_dict(result.model, args.out)
    if args.perms:
        torch.save({g: p.cpu() for g, p in result.perms.items()}, args.perms)
    summary = {
        "model_a": args.model_a,
        "model_b": args.model_b,
        "arch": args.arch,
        "groups": len(spec),
        "cost": args.cost,
        "steps": result.steps,
        "best_cost": result.cost,
        "l2_before": before,
        "l2_after": after,
        "function_rel_error": diff,
        "seconds": result.seconds,
        "out": str(out),
    }
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "history": result.history}, indent=1))
    print(
        f"L2 distance to B: {before:.4g} -> {after:.4g}  ({result.steps} Sinkhorn steps, {result.seconds:.1f} s)"
    )
    print(f"same function as A: max relative output difference {diff:.2g}")
    print(f"saved: {out}")
    return 0
