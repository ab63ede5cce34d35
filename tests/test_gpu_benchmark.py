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


def test_a_failing_section_does_not_hide_the_others(capsys: pytest.CaptureFixture[str]) -> None:
    # A one-shot run on a lent GPU must bring back every row it measured, even when a section breaks.
    module = _load()

    def broken(*args: object) -> object:
        raise RuntimeError("boom in matching")

    module.bench_matching = broken
    with pytest.raises(SystemExit, match="matching"):
        module.main(["--device", "cpu", "--quick"])
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {line.split(" | ")[0].strip("| ") for line in rows} == {"sinkhorn", "step", "align"}
    assert "boom in matching" in captured.err


def test_gpu_check_script_logs_every_step(tmp_path: Path) -> None:
    # The one-call GPU check: each step gets a summary line with its exit status, unknown steps are named.
    import subprocess

    script = SCRIPT.with_name("gpu_check.sh")
    work = tmp_path / "work"  # an empty folder: no .whl/ there, so nothing is installed
    work.mkdir()
    proc = subprocess.run(
        ["bash", str(script), str(tmp_path), "nosuch", "env"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("unknown step nosuch")
    expected_rc = "rc=0" if torch.cuda.is_available() else "rc=1"  # env asks for the GPU's name
    assert summary[1].startswith("env " + expected_rc), summary
    assert (tmp_path / "env.txt").exists()
