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
