"""The CPU thread cap inside the library's heavy calls (:func:`thread_limit`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["THREADS_ENV", "default_threads", "thread_limit"]


#: environment variable: the intra-op thread cap inside the library's heavy calls ("0" or "off" = no cap)
THREADS_ENV = "REBASIN_NUM_THREADS"


def default_threads() -> int | None:
    """The thread cap :func:`thread_limit` applies by default: ``$REBASIN_NUM_THREADS`` when set (``0`` /
    ``off`` = no cap), else 1 thread per 4 cores the process may use, at least 1 and at most 8.

    Example:
        >>> default_threads() is None or default_threads() >= 1
        True
    """
    env = os.environ.get(THREADS_ENV, "").strip().lower()
    if env in ("0", "off", "none"):
        return None
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be an integer or 'off', got {env!r}") from None
        if value < 0:
            raise ValueError(f"{THREADS_ENV} must be >= 0, got {value}")
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 4))


@contextlib.contextmanager
def thread_limit(n: int | None | str = "auto") -> Iterator[None]:
    """Cap torch's intra-op CPU threads to ``n`` inside the block and restore the previous count after.

    ``"auto"`` uses :func:`default_threads`; ``None`` changes nothing. Re-basin runs many small kernels:
    on a busy machine, torch's default (one thread per core) makes every kernel wait for the slowest core,
    which turns seconds into minutes, while a single thread barely slows an idle machine (BENCHMARKS.md).

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with thread_limit(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    limit = default_threads() if n == "auto" else n
    if isinstance(limit, str):
        raise ValueError(f"threads must be an int >= 1, None or 'auto', got {n!r}")
    before = torch.get_num_threads()
    if limit is None or limit >= before:
        yield
        return
    if limit < 1:
        raise ValueError(f"threads must be an int >= 1, None or 'auto', got {n!r}")
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(before)
