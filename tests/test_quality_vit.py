"""The transformer-family quality benchmark runs end to end (a smoke check, not a measurement)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("timm")


def test_mixer_family_smoke(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_vit.py"
    module_spec = importlib.util.spec_from_file_location("quality_vit", path)
    assert module_spec is not None and module_spec.loader is not None
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    rows = bench.main(["--family", "mixer", "--smoke"])
    assert [r["method"] for r in rows] == ["naive", "wm", "align"]
    assert all(r["loss_barrier"] == r["loss_barrier"] and r["seconds"] >= 0 for r in rows)
    naive, wm, aligned = (r["l2"] for r in rows)
    assert wm < naive  # the mixer's spec moves something: weight matching gets closer
    assert aligned <= wm * (1 + 1e-6)  # align never ends farther than its warm start
    assert "| align |" in capsys.readouterr().out
