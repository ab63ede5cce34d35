"""``rebasin spec``: trace an architecture's permutation spec and print its groups and coverage.

The spec is traced with :func:`~rebasin_callbacks.trace_spec` on a random input of ``--input-shape`` and
verified (random permutations must not change the outputs). Boundaries (constructs no permutation crosses)
are listed. ``--json`` writes the spec in Git Re-Basin's format, for ``--spec`` of ``rebasin align`` /
``rebasin lmc`` or for editing by hand (its ``"sizes"`` may be left out: they are read from the model).

Example:
    $ rebasin spec --arch timm:resnet18 --input-shape 3 32 32
    $ rebasin spec --arch torchvision:vgg11 --json vgg11_spec.json
"""

from __future__ import annotations

import argparse

from rebasin_callbacks.commands.common import (
    add_model_arguments,
    build_model,
    check_inputs,
    check_options,
    check_outputs,
    describe_shape,
    example_input,
    guarded,
    input_shape_and_source,
    load_spec,
    resolve_device,
)

__all__ = ["add_arguments", "run", "describe"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``spec`` subcommand's options."""
    add_model_arguments(parser, checkpoints=0)
    parser.add_argument("--json", default=None, help="write the spec (Git Re-Basin format) to this JSON file")
    parser.add_argument(
        "--max-groups", type=int, default=50, help="list at most this many groups (default: %(default)s)"
    )


def describe(spec, state, max_groups: int = 50) -> str:  # type: ignore[no-untyped-def]
    """A table of the spec's groups: size, number of permuted axes, first axis."""
    lines = [f"{'group':40s} {'size':>6s} {'axes':>5s}  first axis"]
    for g in spec.groups[:max_groups]:
        axes = spec.perm_to_axes[g]
        first = f"{axes[0][0]}[{axes[0][1]}]" if axes else "-"
        lines.append(f"{g:40s} {spec.sizes.get(g, 0):6d} {len(axes):5d}  {first}")
    if len(spec) > max_groups:
        lines.append(f"... {len(spec) - max_groups} more (--max-groups)")
    return "\n".join(lines)


@guarded("spec")
def run(args: argparse.Namespace) -> int:
    """Entry point of ``rebasin spec``."""
    check_options(args)
    check_inputs(args)
    check_outputs(args, {"--json": args.json})
    from rebasin_callbacks.io import atomic_write_text

    model = build_model(args.arch, args.num_classes, args.in_chans).to(resolve_device(args.device)).eval()
    shape, source = input_shape_and_source(args, model)
    x = example_input(model, args.arch, shape)
    spec = load_spec(args, model, x)
    state = model.state_dict()
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(
        f"{args.arch}: {describe_shape(shape, source)}, {n_params:,} floating-point values in {len(state)} state entries"
    )
    print(describe(spec, state, args.max_groups))
    print(f"{len(spec)} groups; {spec.coverage(state):.1%} of the values lie on a permuted axis")
    if args.json:
        atomic_write_text(args.json, spec.to_json())
        print(f"spec: {args.json}")
    return 0
