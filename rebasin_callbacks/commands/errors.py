"""Exit statuses, the one-line user error and the wrapper that turns errors into exit statuses.

Example:
    >>> @guarded("demo")
    ... def run(args):
    ...     raise CommandError("--steps must be >= 0, got -1")
    >>> run(None)  # prints "rebasin demo: error: --steps must be >= 0, got -1" to stderr
    2
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from rebasin_callbacks.io import OutputPathError

__all__ = ["EXIT_USAGE", "EXIT_MISMATCH", "EXIT_IO", "CommandError", "guarded", "say"]

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
