"""Library writes (spec JSON, LMC plots) are atomic: a failure half-way leaves the previous file intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rebasin_callbacks import LMCResult, PermutationSpec, plot_lmc


def _spec() -> PermutationSpec:
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    axes = {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H"), "2.bias": (None,)}
    return PermutationSpec.from_axes(axes, net.state_dict())


def test_spec_to_json_failure_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spec.json"
    path.write_text("previous")
    import rebasin_callbacks.io as io

    real = io.os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        _spec().to_json(path)
    monkeypatch.setattr(io.os, "fsync", real)
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]  # no temporary file left
    _spec().to_json(path)
    assert PermutationSpec.from_json(path).perm_to_axes == _spec().perm_to_axes


def test_plot_failure_keeps_the_previous_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    path = tmp_path / "lmc.png"
    path.write_bytes(b"previous")
    curve = LMCResult.from_values([0, 0.5, 1], {"loss": [0.1, 2.0, 0.1]}, label="naive")

    def half_write(self: Figure, fname: object, **kwargs: object) -> None:
        fname.write(b"\x89PNG half")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_write)
    with pytest.raises(OSError, match="No space"):
        plot_lmc([curve], path=path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmc.png"]
    monkeypatch.undo()
    plot_lmc([curve], path=path)
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("signame, status", [("SIGTERM", 128 + 15), ("SIGHUP", 128 + 1), ("SIGINT", None)])
def test_a_signal_during_a_write_leaves_no_partial_file(
    tmp_path: Path, signame: str, status: int | None
) -> None:
    """A write interrupted by a signal leaves the previous file and no ``*.tmp`` (a subprocess is killed)."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    ready = tmp_path / "ready"
    code = f"""
import time, pathlib
from rebasin_callbacks.io import atomic_write
def write(f):
    f.write(b"partial" * 1000); f.flush()
    pathlib.Path({str(ready)!r}).write_text("1")
    time.sleep(60)
atomic_write({str(target)!r}, write)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.stderr else ""
            )
            time.sleep(0.05)
        assert list(tmp_path.glob("*.tmp")) or list(tmp_path.glob(".*.tmp"))  # the write is under way
        proc.send_signal(getattr(signal, signame))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert target.read_bytes() == b"previous"
    if status is not None:
        assert proc.returncode == status
    else:
        assert proc.returncode != 0
