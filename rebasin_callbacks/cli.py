"""The ``rebasin`` command: one subcommand per task (``rebasin demo``, ...).

A subcommand is a module with ``add_arguments(parser)``, ``run(args) -> int`` and optionally a plain-text
``DESCRIPTION`` (else its docstring is the ``--help`` text, examples included), registered in
:data:`COMMANDS`. Only the subcommand being run is imported, and the arguments
are parsed before torch is: keep the modules' top level free of torch, Lightning and timm imports (import
them inside ``run``), so ``rebasin --help`` and usage errors answer at once.

Example:
    $ rebasin demo --smoke
    $ python -m rebasin_callbacks demo --out rebasin-demo
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main", "plain_text"]

#: subcommand -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "align": ("rebasin_callbacks.commands.align", "align checkpoint A to checkpoint B"),
    "lmc": ("rebasin_callbacks.commands.lmc", "linear mode connectivity of two checkpoints"),
    "merge": ("rebasin_callbacks.commands.merge", "merge N checkpoints into one model, aligned to one basin"),
    "spec": ("rebasin_callbacks.commands.spec", "trace and print an architecture's permutation spec"),
    "demo": (
        "rebasin_callbacks.demo",
        "train two MNIST models with Lightning and compare their LMC: naive, re-based, weight matching",
    ),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rebasin-callbacks")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand.

    ``only``: import and describe only this subcommand (the others are listed by name and help), which is
    how :func:`main` keeps its start fast.
    """
    parser = argparse.ArgumentParser(
        prog="rebasin",
        description="Differentiable Sinkhorn re-basin: align models, measure linear mode connectivity.",
    )
    parser.add_argument("--version", action="version", version=f"rebasin-callbacks {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a missing optional dependency disables that subcommand only
            cmd = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            cmd.set_defaults(_run=_unavailable(name, exc))
            continue
        doc = getattr(module, "DESCRIPTION", None) or plain_text(module.__doc__ or "") or help_text
        cmd = sub.add_parser(
            name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def plain_text(doc: str) -> str:
    """A module docstring as ``--help`` text: reStructuredText roles and literals unwrapped.

    Example:
        >>> plain_text("Calls :func:`~rebasin_callbacks.align` with ``--steps 0``.")
        'Calls align with --steps 0.'
    """
    doc = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], doc)
    return doc.replace("``", "").strip()


def _unavailable(name: str, exc: ImportError):
    def run(args: argparse.Namespace) -> int:
        print(f"rebasin {name}: unavailable ({exc}); install the missing package", file=sys.stderr)
        return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
