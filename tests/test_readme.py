"""The README runs as written: every Python snippet in order, and every `rebasin` command line parses.

The Python snippets share one namespace (later ones use what the quickstart trained), run in a temporary
folder on the offline MNIST subset. Only the Avalanche snippet gets something from outside: ``benchmark``,
which its own text says is e.g. ``RotatedMNIST`` (a download); here a two-experience stand-in.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _tiny_benchmark() -> Any:
    from avalanche.benchmarks import tensors_benchmark

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(2)]
    return tensors_benchmark(data, data, task_labels=[0, 0])


def test_readme_python_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("avalanche")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REBASIN_DATA", raising=False)  # the shipped subset: what a fresh machine has
    blocks = _blocks("python")
    assert len(blocks) >= 3, "the README lost its quickstart, Lightning or Avalanche snippet"
    namespace: dict[str, Any] = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, code in enumerate(blocks):
            if "benchmark.train_stream" in code:
                namespace["benchmark"] = _tiny_benchmark()
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)

    # The quickstart's numbers mean something: re-basin lowers the barrier of two trained networks, and the
    # aligned model computes what model A computes.
    naive, rebased = namespace["naive"], namespace["rebased"]
    assert rebased.barrier < 0.5 * naive.barrier, (naive.barrier, rebased.barrier)
    x = namespace["test"].tensors[0][:64]
    torch.testing.assert_close(namespace["aligned"](x), namespace["model_a"](x), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "lmc.png").stat().st_size > 0
    # The Lightning snippet measured two different curves (naive before, re-based after alignment).
    last = namespace["monitor"].results[-1]
    assert last["naive"].barrier != last["rebasin"].barrier


def _command_lines() -> list[list[str]]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "rebasin":
                    lines.append(words[1:])
    return lines


def test_readme_command_lines_parse() -> None:
    from rebasin_callbacks.cli import build_parser

    lines = _command_lines()
    assert any(words[:1] == ["align"] for words in lines) and any(words[:1] == ["demo"] for words in lines)
    parser = build_parser()
    for words in lines:
        parser.parse_args(words)  # a misspelt flag or a missing argument exits 2 here
