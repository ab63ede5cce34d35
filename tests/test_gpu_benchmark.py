"""benchmarks/gpu.py runs end to end (tiny sizes) and prints one timed row per workload and device."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_gpu_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_gpu_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def _check(rows: list[dict], out: str, device: str) -> None:
    sections = {r["section"] for r in rows}
    assert sections == {"sinkhorn", "matching", "step", "align"}
    # every Sinkhorn cell: 2 sizes x 2 temperatures x 3 methods
    assert sum(r["section"] == "sinkhorn" for r in rows) == 12
    for r in rows:
        value, unit = r["time"].split()
        assert float(value) > 0 and unit in ("ms", "s")
    table = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == len(rows) + 1  # header + one line per row
    assert all(line.rstrip(" |").endswith(device) for line in table[1:])


def test_quick_run_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _load().main(["--device", "cpu", "--quick"])
    out = capsys.readouterr().out
    _check(rows, out, f"cpu ({torch.get_num_threads()} threads)")
    assert all(r["peak"] == "-" for r in rows)  # no CUDA peak on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_run_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _load().main(["--device", "cuda", "--quick"])
    out = capsys.readouterr().out
    _check(rows, out, torch.cuda.get_device_name())
    assert all(float(r["peak"]) > 0 for r in rows)
