"""``rebasin lmc``: loss and accuracy on the straight line between two checkpoints, barrier and AUC.

Evaluates ``(1 - lam) * A + lam * B``, lam from 0 (model A) to 1 (model B), on the test split of ``--data``
and reports the loss / accuracy barrier (supplement Eq. 2) and AUC (Eq. 3), and the endpoints' own loss and
accuracy. With ``--align``, model A is also re-based to B (Sinkhorn, as ``rebasin align``) and weight-matched
(Git Re-Basin), giving three curves: naive, re-based, weight matching (two with ``--steps 0``: naive and
weight matching). ``--reset-bn`` recomputes BatchNorm statistics at every point and ``--repair`` applies
REPAIR (both on the training split).

The input shape is printed: ``--input-shape``, else the data's own image size with the stem's channels
(MNIST: 28 x 28), else the architecture's default. ``--plot`` writes a PNG of the curves (test loss and
accuracy against lambda, each curve's barrier in the legend); ``--json`` the curves, barriers and AUCs
(strict JSON: NaN is written as null).

Exit status: 0 on success, 2 for a missing / unreadable file, NaN or infinite weights, a malformed
``--spec``, a ``--submodule`` the checkpoint lacks or a bad option, 3 when a checkpoint does not fit the
architecture.

Example:
    $ rebasin lmc a.pt b.pt --arch mypackage.models:mlp --data mnist --align --plot lmc.png
    $ rebasin lmc a.ckpt b.ckpt --arch torchvision:resnet18 --data mnist --align --reset-bn \\
          --plot lmc.png --json lmc.json
"""

from __future__ import annotations

import argparse
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

__all__ = ["add_arguments", "run", "format_table", "describe_endpoints"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``lmc`` subcommand's options."""
    add_model_arguments(parser)
    add_data_arguments(parser, required=True)
    parser.add_argument("--align", action="store_true", help="add the re-based and weight-matching curves")
    add_align_arguments(parser)
    fix = parser.add_mutually_exclusive_group()
    fix.add_argument("--reset-bn", action="store_true", help="recompute BatchNorm statistics at every point")
    fix.add_argument("--repair", action="store_true", help="REPAIR every point (renormalise its activations)")
    parser.add_argument(
        "--n-points", type=int, default=11, help="points on each curve (default: %(default)s)"
    )
    parser.add_argument("--plot", default=None, help="save the loss / accuracy curves as a PNG here")
    parser.add_argument("--json", default=None, help="save the curves, barriers and AUCs as JSON here")


def format_table(curves: dict[str, Any]) -> str:
    """A plain-text table of loss / accuracy barriers and AUCs, one row per curve."""
    head = f"{'':22s} {'loss barrier':>13s} {'loss AUC':>10s} {'acc barrier':>12s} {'acc AUC':>9s}"
    rows = [head, "-" * len(head)]
    for label, c in curves.items():
        acc_b, acc_a = c.barriers.get("accuracy", float("nan")), c.aucs.get("accuracy", float("nan"))
        rows.append(f"{label:22s} {c.barrier:13.4f} {c.auc:10.4f} {acc_b:12.4f} {acc_a:9.4f}")
    return "\n".join(rows)


def describe_endpoints(curve: Any, name_a: str, name_b: str, *, n_classes: int) -> str:
    """The endpoints' own loss / accuracy (a barrier means little when an endpoint is bad on this data), with
    a warning when an endpoint is not clearly better than chance.

    Example:
        >>> from rebasin_callbacks.lmc import LMCResult
        >>> c = LMCResult.from_values([0, 0.5, 1], {"loss": [0.2, 1.0, 0.3], "accuracy": [0.95, 0.6, 0.08]})
        >>> print(describe_endpoints(c, "a.pt", "b.pt", n_classes=10))  # doctest: +NORMALIZE_WHITESPACE
        endpoints: A (a.pt) loss 0.2000 accuracy 0.9500; B (b.pt) loss 0.3000 accuracy 0.0800
        warning: B (b.pt) has accuracy 0.0800 on this data, chance is 0.1000: the data is probably not
        what it was trained on (input size and channels: --input-shape; normalisation), so the barrier
        above means little
    """
    lines, warnings = [], []
    parts = []
    for side, name, index in (("A", name_a, 0), ("B", name_b, -1)):
        loss = curve.values.get("loss", [float("nan")])[index]
        acc = curve.values.get("accuracy")
        text = f"{side} ({name}) loss {loss:.4f}"
        if acc is not None:
            text += f" accuracy {acc[index]:.4f}"
            chance = 1.0 / n_classes
            if acc[index] < 2 * chance:
                warnings.append(
                    f"warning: {side} ({name}) has accuracy {acc[index]:.4f} on this data, chance is "
                    f"{chance:.4f}: the data is probably not what it was trained on (input size and "
                    "channels: --input-shape; normalisation), so the barrier above means little"
                )
        parts.append(text)
    lines.append("endpoints: " + "; ".join(parts))
    return "\n".join(lines + warnings)


@guarded("lmc")
def run(args: argparse.Namespace) -> int:
    """Entry point of ``rebasin lmc``."""
    check_options(args)
    check_inputs(args)
    check_outputs(args, {"--plot": args.plot, "--json": args.json})
    import torch

    from rebasin_callbacks.io import atomic_write_json
    from rebasin_callbacks.lmc import lmc_curve, plot_lmc

    kwargs = align_kwargs(args)
    say(f"loading {args.model_a} and {args.model_b} as {args.arch}")
    model_a, model_b = load_models(args)
    shape, source = input_shape_and_source(args, model_a)
    say("evaluating at " + describe_shape(shape, source))
    x = example_input(model_a, args.arch, shape)
    loader: dict[str, Any] = {"device": x.device, "dtype": x.dtype}
    test = make_loader(args, shape, train=False, **loader)
    train = make_loader(args, shape, train=True, **loader) if (args.reset_bn or args.repair) else None
    options = dict(
        n_points=args.n_points, reset_bn=args.reset_bn, repair=args.repair, bn_data=train,
        progress=not args.no_progress,
    )  # fmt: skip
    versions: dict[str, torch.nn.Module] = {"naive": model_a}
    if args.align:
        say(f"reading the permutation spec {args.spec}" if args.spec else "tracing the permutation spec")
        spec = load_spec(args, model_a, x)
        if args.cost in ("mid", "rnd"):
            kwargs.update(data=make_loader(args, shape, train=True, **loader),
                          loss_fn=torch.nn.functional.cross_entropy)  # fmt: skip
        versions.update(_aligned_versions(args, model_a, model_b, spec, kwargs))
    curves: dict[str, Any] = {}
    for label, model in versions.items():
        say(f"evaluating {args.n_points} points of the {label} curve")
        curves[label] = lmc_curve(model, model_b, test, label=label, **options)
    print(format_table(curves))
    for label, c in curves.items():
        for metric, lambdas in (getattr(c, "nonfinite", None) or {}).items():
            print(f"warning: the {label} curve's {metric} is NaN or infinite at lambda {lambdas}: its {metric} "
                  "barrier and AUC are NaN (null in --json), not a measurement")  # fmt: skip
    print(describe_endpoints(next(iter(curves.values())), args.model_a, args.model_b, n_classes=10))
    if args.plot:
        data = {"mnist": "MNIST", "digits": "digits"}.get(args.data, args.data)
        fix = (
            ", BatchNorm reset at each point"
            if args.reset_bn
            else ", REPAIR at each point"
            if args.repair
            else ""
        )
        title = f"{args.arch}: A -> B, input {'x'.join(map(str, shape))}{fix}"
        plot_lmc(curves, title=title, path=args.plot, split=f"{data} test")  # written atomically
        print(f"plot: {args.plot}")
    if args.json:
        atomic_write_json(args.json, {k: c.to_dict() for k, c in curves.items()})  # strict: NaN -> null
        print(f"json: {args.json}")
    return 0


def _aligned_versions(
    args: argparse.Namespace, model_a: torch.nn.Module, model_b: torch.nn.Module, spec: Any, kwargs: dict
) -> dict[str, torch.nn.Module]:
    """The re-based (Sinkhorn) and weight-matching versions of A; weight matching only with ``--steps 0``
    (the re-based one would be the same model)."""
    from rebasin_callbacks.align import align
    from rebasin_callbacks.matching import weight_matching
    from rebasin_callbacks.permute import permute

    try:
        if args.steps == 0:
            say(f"aligning {args.model_a} to {args.model_b} (weight matching only, --steps 0)")
            return {
                "weight matching": permute(
                    model_a, spec, weight_matching(model_a, model_b, spec, seed=args.seed)
                )
            }
        say(
            f"aligning {args.model_a} to {args.model_b} (Sinkhorn, up to {args.steps} steps; then weight matching)"
        )
        return {
            "re-based (Sinkhorn)": align(model_a, model_b, spec=spec, **kwargs).model,
            "weight matching": permute(
                model_a, spec, weight_matching(model_a, model_b, spec, seed=args.seed)
            ),
        }
    except ValueError as exc:
        raise CommandError(f"align failed: {exc}", EXIT_MISMATCH) from None
