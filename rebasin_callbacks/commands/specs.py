"""The permutation spec of a subcommand: ``--spec`` (read, checked and verified) or traced from an example.

A ``--spec`` file is Git Re-Basin's JSON (``rebasin spec --json`` writes it): ``{"axes_to_perm": {key:
[entry, ...]}, "sizes": {group: n}}``, where an entry is ``null``, a group name, or a list of blocks (a
group name or ``[group, repeat]``). ``"sizes"`` may be left out: the sizes are read from the model. Anything
else is one line naming what is wrong (exit status 2), before any work.

Example:
    >>> parse_spec_json('{"axes_to_perm": {"0.weight": ["P0", 3]}}', "s.json")
    Traceback (most recent call last):
    ...
    rebasin_callbacks.commands.errors.CommandError: --spec s.json: axes_to_perm['0.weight'][1] is 3: expected null, a group name or a list of blocks
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import TYPE_CHECKING, Any

from rebasin_callbacks.commands.errors import EXIT_MISMATCH, CommandError

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["parse_spec_json", "load_spec"]


def _check_block(block: Any) -> bool:
    if isinstance(block, str) or block is None:
        return True
    return (
        isinstance(block, list)
        and len(block) == 2
        and isinstance(block[0], str)
        and isinstance(block[1], int)
        and not isinstance(block[1], bool)
        and block[1] > 0
    )


def parse_spec_json(text: str, path: str) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """``(axes_to_perm, sizes)`` of a spec file's text, every entry checked.

    Raises:
        CommandError: not JSON, or not a spec (the message names the first wrong entry).
    """
    where = f"--spec {path}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CommandError(
            f'{where}: expected a JSON object with "axes_to_perm", got a {type(data).__name__}'
        )
    axes = data.get("axes_to_perm")
    if not isinstance(axes, dict) or not axes:
        raise CommandError(
            f'{where}: "axes_to_perm" must be a non-empty object {{state key: [axis entry, ...]}}'
        )
    for key, entries in axes.items():
        if not isinstance(entries, list):
            raise CommandError(
                f"{where}: axes_to_perm[{key!r}] is {entries!r}: expected a list, one entry per axis"
            )
        for i, entry in enumerate(entries):
            if isinstance(entry, list):
                ok = bool(entry) and all(_check_block(b) for b in entry)
            else:
                ok = entry is None or isinstance(entry, str)
            if not ok:
                raise CommandError(
                    f"{where}: axes_to_perm[{key!r}][{i}] is {json.dumps(entry)}: expected null, a group name "
                    "or a list of blocks"
                )
    sizes = data.get("sizes", {})
    if not isinstance(sizes, dict):
        raise CommandError(f'{where}: "sizes" must be an object {{group: size}}, got {json.dumps(sizes)}')
    for group, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise CommandError(
                f"{where}: sizes[{group!r}] is {json.dumps(size)}: expected a positive integer"
            )
    return axes, sizes


def _read_spec(args: argparse.Namespace, model: nn.Module) -> Any:
    from rebasin_callbacks.spec import PermutationSpec, SpecMismatchError

    try:
        with open(args.spec, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"--spec {args.spec}: cannot be read ({exc})") from None
    axes, sizes = parse_spec_json(text, args.spec)
    try:  # sizes left out are read from the model's shapes
        return PermutationSpec.from_axes(axes, shapes=model.state_dict(), sizes=sizes)
    except SpecMismatchError as exc:
        raise CommandError(f"--spec {args.spec}: does not fit {args.arch}: {exc}", EXIT_MISMATCH) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise CommandError(f"--spec {args.spec}: not a permutation spec ({exc})") from None


def load_spec(args: argparse.Namespace, model: nn.Module, example: Tensor) -> Any:
    """``--spec`` (checked against the model) or a spec traced from ``example``; boundary warnings printed.

    Both go through the library's one resolver (:func:`rebasin_callbacks.spec_source.resolve_spec`); the
    command adds what a command line needs: the file's entries checked one by one for a one-line message,
    the hand-written spec verified in float64 before any work, every failure an exit status.
    """
    from rebasin_callbacks.spec_source import resolve_spec
    from rebasin_callbacks.trace import SpecCheckError, UntraceableModelError, check_spec

    if args.spec:
        try:
            spec = resolve_spec(model, _read_spec(args, model), purpose="nothing to align")
        except ValueError as exc:  # no permutation groups
            raise CommandError(f"--spec {args.spec}: {exc}", EXIT_MISMATCH) from None
        try:  # a hand-written spec is verified before any work: a wrong one would change the model's function
            check_spec(model, spec, example)
        except SpecCheckError as exc:
            raise CommandError(f"--spec {args.spec}: {exc}; nothing was written", EXIT_MISMATCH) from None
        return spec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            spec = resolve_spec(model, None, example, purpose="nothing to align")
        except UntraceableModelError as exc:
            raise CommandError(f"--arch {args.arch}: {exc}; write a spec by hand and pass --spec") from None
        except ValueError as exc:  # no permutation groups
            raise CommandError(f"--arch {args.arch}: {exc}", EXIT_MISMATCH) from None
    for w in caught:
        if "trace_spec" in str(w.message):
            print(f"note: {w.message}")
    return spec
