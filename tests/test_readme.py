"""The README runs as written: each Python block on its own (a fresh namespace, offline, in a temporary
folder), and every `rebasin` command line of the README and of each subcommand's ``--help`` parses."""

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


def _python_block(marker: str) -> str:
    (block,) = [b for b in _blocks("python") if marker in b]
    return block


def _run(code: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REBASIN_DATA", raising=False)  # the shipped subset: what a fresh machine has
    namespace: dict[str, Any] = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"README.md {name} block", "exec"), namespace)
    return namespace


def test_every_python_block_is_tested() -> None:
    markers = (
        "from rebasin_callbacks import align",
        "from rebasin_callbacks import merge",
        "LMCMonitor(",
        "ReBasinPlugin(",
    )
    assert len(_blocks("python")) == len(markers)
    for marker in markers:
        _python_block(marker)


def test_quickstart_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = _run(_python_block("from rebasin_callbacks import align"), "quickstart", tmp_path, monkeypatch)
    # its numbers mean something: re-basin lowers the barrier of two trained networks, and the aligned model
    # computes what model A computes
    naive, rebased = ns["naive"], ns["rebased"]
    assert rebased.barrier < 0.5 * naive.barrier, (naive.barrier, rebased.barrier)
    x = ns["test"].tensors[0][:64]
    torch.testing.assert_close(ns["aligned"](x), ns["model_a"](x), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "lmc.png").stat().st_size > 0


def test_merge_block_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = _run(_python_block("from rebasin_callbacks import merge"), "merge", tmp_path, monkeypatch)
    result, evaluation = ns["result"], ns["evaluation"]
    assert len(result.perms) == 3 and result.cycle_error() == 0.0
    # a merge worth the name: far above chance, and closer to the models than their plain average
    assert evaluation.merged["accuracy"] > 0.6, evaluation.summary()
    assert result.history["distance"][-1] < result.history["distance"][0]


def test_lightning_block_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning")
    ns = _run(_python_block("LMCMonitor("), "Lightning", tmp_path, monkeypatch)
    last = ns["monitor"].results[-1]
    assert (
        last["naive"].barrier != last["rebasin"].barrier
    )  # measured before and after that epoch's alignment
    assert (tmp_path / "lightning_logs").is_dir()  # where the README says Lightning writes


def test_avalanche_block_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("avalanche")
    ns = _run(_python_block("ReBasinPlugin("), "Avalanche", tmp_path, monkeypatch)
    assert ns["rebasin"].incremental.episodes_done == len(ns["benchmark"].train_stream) - 1
    assert ns["strategy"].train_mb_size == 500  # PAPER_SETTINGS reached the strategy


def _command_lines(text: str, prompt: str = "") -> list[list[str]]:
    """The words after ``rebasin`` of every command line in ``text`` (lines starting with ``prompt``; ``&&``
    and ``\\`` continuations handled, comments dropped)."""
    lines = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line.startswith(prompt):
            continue
        line = line.removeprefix(prompt).split("#", 1)[0]
        for part in line.split("&&"):
            if not part.strip().startswith("rebasin "):
                continue  # prose, or another program
            words = shlex.split(part)
            if words and words[0] == "rebasin":
                lines.append(words[1:])
    return lines


def test_readme_command_lines_parse() -> None:
    from rebasin_callbacks.cli import build_parser

    lines = [w for block in _blocks("bash") for w in _command_lines(block)]
    assert any(words[:1] == ["align"] for words in lines) and any(words[:1] == ["demo"] for words in lines)
    parser = build_parser()
    for words in lines:
        parser.parse_args(words)  # a misspelt flag or a missing argument exits 2 here


def test_help_examples_parse() -> None:
    from rebasin_callbacks.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in COMMANDS:
        lines = _command_lines(sub.choices[name].description or "", prompt="$ ")
        assert lines or name == "demo", f"rebasin {name} --help shows no example"
        for words in lines:
            assert words[0] == name, (name, words)
            parser.parse_args(words)
