"""Refusals that need a run to happen: a model that returns NaN, retrievers that find nothing, a full disk."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli, write_beir

from miner.resume import work_dir

pytestmark = pytest.mark.usefixtures("prefect_server")


def _one_line_refusal(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def nan_cross_encoder(tmp_path_factory: pytest.TempPathFactory, tiny_cross_encoder: Path) -> Path:
    """The tiny cross-encoder with its classifier weights set to NaN: a real model whose every score is NaN."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("nan-cross-encoder")
    model = BertForSequenceClassification.from_pretrained(str(tiny_cross_encoder))
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_cross_encoder)).save_pretrained(str(folder))
    return folder


def test_a_teacher_that_returns_nan_is_refused_with_the_rule_that_emptied_the_pool(
    tiny_beir: Path, nan_cross_encoder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["--no-dense", "--expansion-depth", 0, "--cross-encoder", nan_cross_encoder]
    line = _one_line_refusal(*run_cli("mine", tiny_beir, "--out", out, "-q", *args)[::2])
    assert line.startswith("error: settings: no candidate survived the filter (invalid_score removed ")
    assert not out.exists()


def test_retrievers_that_find_nothing_are_refused(tmp_path: Path) -> None:
    # Queries made of stop words only: BM25 (the only retriever here) has no term to match.
    data = write_beir(
        tmp_path / "data",
        [{"_id": "d1", "text": "lift on a swept wing"}, {"_id": "d2", "text": "boundary layer transition"}],
        [{"_id": "q1", "text": "the of and"}],
        [("q1", "d1", 1)],
    )
    out = tmp_path / "out"
    line = _one_line_refusal(*run_cli("mine", data, "--out", out, "-q", "--no-dense", "--expansion-depth", 0)[::2])
    assert line.startswith("error: retrieval: the retrievers returned no candidate for any query")
    assert not out.exists()


def _limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_that_runs_out_of_room_is_one_line_and_the_run_resumes(
    tiny_beir: Path, tmp_path: Path, prefect_server: str
) -> None:
    # A file-size limit stands in for a full disk: the embedding cache shard (86 documents x 384 floats,
    # about 130 KB) is the first write past it. Python ignores SIGXFSZ, so the write fails with EFBIG.
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "miner.cli", "mine", str(tiny_beir), "--out", str(out), "-q"]
    command += ["--no-bm25", "--cache-dir", str(cache)]
    limited = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: _limit_file_size(100_000),
        # The test server's database lies outside the limit; an ephemeral one would be held to it.
        env={**os.environ, "PREFECT_API_URL": prefect_server},
    )
    line = _one_line_refusal(limited.returncode, limited.stderr)
    assert "ran out of room while writing (File too large)" in line and "run the same command again" in line
    assert not out.exists() or not any(out.iterdir())
    assert not list(cache.rglob("*.tmp"))

    code, _, stderr = run_cli(*command[3:])
    assert code == 0, stderr
    assert not work_dir(out).exists()


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs, when this process may mount one (root on the CI machines); skipped otherwise."""
    mount_point = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_too_little_free_disk_is_refused_before_any_model_runs(
    small_beir: Path, small_filesystem: Path, tmp_path: Path
) -> None:
    out, cache = small_filesystem / "out", tmp_path / "cache"
    code, _, stderr = run_cli("mine", small_beir, "--out", out, "--cache-dir", cache, "-q")
    line = _one_line_refusal(code, stderr)
    assert f"error: {small_filesystem}: not enough free disk: this run needs about " in line
    assert "outputs" in line and "stage checkpoints" in line and "KB is free" in line
    assert not cache.exists()  # refused before the embedding stage
    assert list(small_filesystem.iterdir()) == []
