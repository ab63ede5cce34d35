"""Safe output files: checked before any work, written atomically, never one of the inputs.

Every file the library and the ``rebasin`` command write goes through :func:`atomic_write`: the bytes go to a
temporary file in the destination's folder, which is flushed, ``fsync``-ed and then renamed over the
destination (``os.replace``, atomic on POSIX and Windows). A failure half-way (disk full, a file-size limit,
Ctrl-C, ``SIGTERM`` or ``SIGHUP``) leaves the previous file as it was and no partial file behind: while a
file is written from the main thread, those signals (when their handler is the default one, which would end
the process on the spot) raise ``SystemExit(128 + signal)`` instead, so the temporary file is removed before
the process ends with the usual status. JSON is written strictly (:func:`atomic_write_json`): a NaN or
infinity becomes ``null``, never the non-standard ``NaN`` constant.

:func:`check_output_paths` runs before any work: it refuses an output that is one of the inputs (after
resolving symlinks, relative paths and hard links), two outputs that are the same file, a directory, and a
folder that cannot be written.

Example:
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     out = os.path.join(d, "summary.json")
    ...     _ = atomic_write_text(out, '{"ok": true}')
    ...     open(out).read()
    '{"ok": true}'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "OutputPathError",
    "atomic_write",
    "atomic_write_text",
    "atomic_torch_save",
    "atomic_write_json",
    "strict_json",
    "check_output_paths",
    "same_file",
]

PathLike = str | os.PathLike[str]


class OutputPathError(ValueError):
    """An output path that must not or cannot be written (an input, a directory, an unwritable folder)."""


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file: equal after resolving symlinks and ``..``, or hard links.

    Example:
        >>> same_file("x/../a.pt", "a.pt")
        True
    """
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def _nearest_existing(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def _check_writable(name: str, path: Path) -> None:
    if path.is_dir():
        raise OutputPathError(f"{name} {path}: is a directory; give a file name")
    folder = path.absolute().parent
    base = folder if folder.exists() else _nearest_existing(folder)
    if not base.is_dir():
        raise OutputPathError(f"{name} {path}: {base} is not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{name} {path}: the file exists and is read-only")
    try:  # a real probe: os.access says yes to root on read-only mounts
        fd, probe = tempfile.mkstemp(dir=base, prefix=".rebasin-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{name} {path}: cannot write into {base} ({exc.strerror or exc})") from None


def check_output_paths(
    outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None]
) -> dict[str, Path]:
    """Check every output path before any work; returns ``{name: Path}`` of the outputs given.

    ``outputs`` / ``inputs`` map a name for messages (``"--out"``, ``"MODEL_A"``) to a path or ``None``
    (option not given).

    Raises:
        OutputPathError: an output is one of the inputs, two outputs are the same file, an output is a
            directory, or its folder cannot be written (the message names the option and the path).

    Example:
        >>> check_output_paths({"--json": "a.pt"}, {"MODEL_A": "./a.pt"})
        Traceback (most recent call last):
        ...
        rebasin_callbacks.io.OutputPathError: --json a.pt is MODEL_A (a.pt): refusing to overwrite an input
    """
    given = {name: Path(p) for name, p in outputs.items() if p is not None}
    sources = {name: Path(p) for name, p in inputs.items() if p is not None}
    for name, path in given.items():
        for src_name, src in sources.items():
            if same_file(path, src):
                raise OutputPathError(f"{name} {path} is {src_name} ({src}): refusing to overwrite an input")
    names = list(given)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if same_file(given[a], given[b]):
                raise OutputPathError(f"{a} and {b} name the same file ({given[a]})")
    for name, path in given.items():
        _check_writable(name, path)
    return given


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: Signals whose default action ends the process at once (no ``finally`` runs): turned into ``SystemExit``
#: while a temporary file exists. ``SIGINT`` already raises ``KeyboardInterrupt``.
_FATAL_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While inside: a terminating signal with its default handler raises ``SystemExit`` (main thread only;
    a handler the program installed itself is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _FATAL_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) == signal.SIG_DFL:
                previous[sig] = signal.signal(sig, _exit_on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, handler)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    with _signals_raise():
        with _atomic_file_unguarded(path) as f:
            yield f


@contextlib.contextmanager
def _atomic_file_unguarded(path: Path) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary binary file, then move it over ``path`` atomically.

    Missing parent folders are created. If ``write`` raises, ``path`` keeps its previous content and the
    temporary file is removed.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = atomic_write(os.path.join(d, "x.bin"), lambda f: f.write(b"abc"))
        ...     p.read_bytes()
        b'abc'
    """
    path = Path(path)
    with _atomic_file(path) as f:
        write(f)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None``, for strict JSON.

    Example:
        >>> strict_json({"barrier": float("nan"), "values": [1.0, float("inf")]})
        {'barrier': None, 'values': [1.0, None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON (NaN and infinities become ``null``: :func:`strict_json`), atomically.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = atomic_write_json(os.path.join(d, "r.json"), {"barrier": float("nan")}, indent=None)
        ...     p.read_text()
        '{"barrier": null}'
    """
    return atomic_write_text(path, json.dumps(strict_json(obj), indent=indent, allow_nan=False))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`).

    Example:
        >>> import os, tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = atomic_torch_save({"w": torch.ones(2)}, os.path.join(d, "w.pt"))
        ...     torch.load(p, weights_only=True)["w"].tolist()
        [1.0, 1.0]
    """
    import torch  # here, not at the top: the CLI checks its outputs before importing torch

    return atomic_write(path, lambda f: torch.save(obj, f))
