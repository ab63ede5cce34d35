"""Split CIFAR-100 with a multi-head ResNet18 runs end to end (on a synthetic stand-in of the same shape)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("avalanche")
pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[2]


def test_split_cifar100_multihead_resnet18_smoke(tmp_path: Path) -> None:
    out = tmp_path / "split"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "incremental.py"),
            "--benchmark",
            "split-cifar100",
            "--synthetic",
            "--smoke",
            "--quiet",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(
        r"^\| (rebasin\[[a-z]+,permuted[^|]*|naive) \| ([0-9.]+) \| ([0-9.]+) \|", proc.stdout, re.M
    )
    names = {name.strip() for name, _, _ in rows}
    has_rebasin = any(n.startswith("rebasin[") for n in names)
    assert has_rebasin and "naive" in names, proc.stdout[-2000:]
    for _, acc, forg in rows:
        assert 0.0 <= float(acc) <= 1.0 and 0.0 <= float(forg) <= 1.0
    assert out.with_suffix(".json").exists()
