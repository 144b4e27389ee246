"""Day-to-day command-line options: --version, --json logs, shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from conftest import miner_process

_miner = miner_process


def test_version(tmp_path: Path) -> None:
    result = _miner("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"hardneg-miner {version('hardneg-miner')}"


def test_json_logs_are_json_lines_and_the_result_is_one_json_object(tiny_beir: Path, tmp_path: Path) -> None:
    result = _miner("mine", tiny_beir, "--out", "out", "--no-bm25", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    summary = json.loads(line)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["negatives"] == manifest["counts"]["sample"]["negatives"] > 0
    assert summary["manifest"] == str(tmp_path / "out" / "manifest.json")
    records = [json.loads(line) for line in result.stderr.strip().splitlines() if line.startswith("{")]
    assert any(r["logger"].startswith("miner") and "wrote" in r["message"] for r in records)
    # Nothing else on stderr: no progress bars, no plain-text log lines (Java's own start-up notes aside).
    others = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("{", "WARNING:"))]
    assert others == []


def test_shell_completion_script_is_offered(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "miner.cli", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout and "miner" in result.stdout.lower()


def test_an_unknown_flag_is_one_line_with_the_flag_it_was_probably_meant_to_be(tmp_path: Path) -> None:
    result = _miner("mine", "data", "--num-negative", "3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --num-negative: no such option; did you mean --num-negatives? (`miner mine --help` lists the options)"
    )
    result = _miner("mine", "data", "--zzz", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --zzz: no such option; `miner mine --help` lists the options"
