"""Run every example with --smoke in a subprocess (offline, CPU): it must exit 0 and write its pictures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

#: example -> pictures it must write into --out
PICTURES = {
    "align_mlp": ["mlp_model_a.png", "mlp_rebasin.gif", "mlp_model_b.png"],
    "align_cnn": ["cnn_model_a.png", "cnn_rebasin.gif", "cnn_model_b.png"],
    "align_resnet": ["resnet_model_a.png", "resnet_rebasin.gif", "resnet_model_b.png"],
    "lmc_mlp": ["lmc.png"],
    "lmc_cnn": ["lmc.png"],
    "lmc_resnet": ["lmc.png"],
    "continual_avalanche": ["accuracy.png"],
    "lightning_callbacks": ["barriers.png", "model_a.ckpt", "model_b_aligned.pt"],
}
NEEDS = {"continual_avalanche": "avalanche", "lightning_callbacks": "lightning", "align_resnet": "torchvision",
         "lmc_resnet": "torchvision"}  # fmt: skip
MAGIC = {".png": b"\x89PNG", ".gif": b"GIF8"}


def test_every_example_is_listed():
    found = {p.stem for p in EXAMPLES.glob("*.py")} - {"common", "make_gallery"}
    assert found == set(PICTURES)


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_example_smoke(name, tmp_path):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    pytest.importorskip("matplotlib")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for picture in PICTURES[name]:
        path = tmp_path / picture
        assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {picture}"
        if path.suffix in MAGIC:
            assert path.read_bytes().startswith(MAGIC[path.suffix])
