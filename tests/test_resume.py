"""Crash safety: a CLI process killed with SIGKILL at many moments, then re-run; nothing partial, same rows."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_nothing_partial, assert_rerun_gives, run_cli, wait_for

from miner.config import load_config
from miner.resume import StageStore, run_key, work_dir
from miner.run import ingest_from_config

pytestmark = pytest.mark.usefixtures("prefect_server")

# Checkpointed stages, in the order a default run meets them, after which a trial kills the run.
# (dense and pool take milliseconds: a kill after embed or teacher lands in them or just past them.)
KILL_AFTER = ("bm25", "embed", "teacher", "geometry", "filter", "sample")
RANDOM_TRIALS = 3


def _command(data: Path, out: Path, cache: Path) -> list[str]:
    return ["mine", str(data), "--out", str(out), "--cache-dir", str(cache), "-q"]


def _start(data: Path, out: Path, cache: Path, api_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.Popen(
        [sys.executable, "-m", "miner.cli", *_command(data, out, cache)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigkill_at_many_moments_then_rerun_gives_the_same_rows(
    tiny_beir: Path, tmp_path: Path, prefect_server: str
) -> None:
    reference_out = tmp_path / "reference"
    started = time.monotonic()
    finished = _start(tiny_beir, reference_out, tmp_path / "cache-reference", prefect_server).wait(timeout=600)
    uninterrupted_seconds = time.monotonic() - started
    assert finished == 0
    reference = pq.read_table(reference_out / "negatives.parquet")

    # One output folder for every trial: later trials are killed while replacing a finished output.
    out = tmp_path / "out"
    rng = random.Random(20261122)
    moments: list[tuple[str, float]] = [(f"after {stage}", rng.uniform(0, 0.03)) for stage in KILL_AFTER]
    moments.append(("writing outputs", 0.0))
    moments += [("at random", rng.uniform(0.5, uninterrupted_seconds)) for _ in range(RANDOM_TRIALS)]
    killed_in_flight = 0
    for trial, (moment, delay) in enumerate(moments):
        cache = tmp_path / f"cache-{trial}"  # cold, so that encoding itself can be interrupted
        process = _start(tiny_beir, out, cache, prefect_server)
        if moment.startswith("after "):
            reached = wait_for(work_dir(out) / f"{moment.removeprefix('after ')}.done.json", process)
        elif moment == "writing outputs":
            (out / "manifest.json").unlink(missing_ok=True)
            reached = wait_for(out / "negatives.parquet", process)
        else:
            reached = True
        time.sleep(delay)
        if process.poll() is None:
            killed_in_flight += 1
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert reached, f"trial {trial} ({moment}): the run ended before that point"
        assert_nothing_partial(out)

        assert_rerun_gives(reference, _command(tiny_beir, out, cache), out, f"trial {trial} ({moment})")
    # Most kills must land while the run was working, or the trials test nothing.
    assert killed_in_flight >= len(moments) - 2


def _store_for(data: Path, out: Path, **overrides: object) -> StageStore:
    config = load_config(None, {"data": data, "out": out, "retrieval.bm25": False, **overrides})
    return StageStore(out, run_key(config, ingest_from_config(config).input_hashes))


def _flat_teacher(data: Path, out: Path, score: float) -> pa.Table:
    """A teacher table unlike any the model would give: every score the same."""
    code, _, stderr = run_cli("mine", data, "--out", out, "-q", "--no-bm25")
    assert code == 0, stderr
    negatives = pq.read_table(out / "negatives.parquet")
    pairs = pa.table({"query_id": negatives["query_id"], "doc_id": negatives["negative_id"]})
    positives = pa.table({"query_id": negatives["query_id"], "doc_id": negatives["positive_id"]})
    table = pa.concat_tables([pairs, positives]).group_by(["query_id", "doc_id"]).aggregate([])
    return table.append_column("teacher_score", pa.array([score] * table.num_rows, pa.float32()))


def test_a_finished_stage_is_loaded_not_run_and_a_damaged_one_is_run_again(tiny_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flat = _flat_teacher(tiny_beir, out, 0.25)
    store = _store_for(tiny_beir, out)
    store.save("teacher", flat)
    code, _, stderr = run_cli("mine", tiny_beir, "--out", out, "-q", "--no-bm25")
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_stages"] == ["teacher"]
    assert set(pq.read_table(out / "negatives.parquet")["negative_score"].to_pylist()) == {0.25}
    assert not work_dir(out).exists()

    store = _store_for(tiny_beir, out)
    store.save("teacher", flat)
    checkpoint = work_dir(out) / "teacher.parquet"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])  # a torn write the record does not vouch for
    code, _, stderr = run_cli("mine", tiny_beir, "--out", out, "-q", "--no-bm25")
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["resumed_stages"] == []
    assert len(set(pq.read_table(out / "negatives.parquet")["negative_score"].to_pylist())) > 1


def test_checkpoints_of_other_settings_are_discarded(tiny_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flat = _flat_teacher(tiny_beir, out, 0.25)
    _store_for(tiny_beir, out, **{"sample.num_negatives": 3}).save("teacher", flat)
    code, _, stderr = run_cli("mine", tiny_beir, "--out", out, "-q", "--no-bm25")
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["resumed_stages"] == []
    # Settings that change only speed keep the checkpoints.
    _store_for(tiny_beir, out, **{"models.batch_size": 3, "threads": 1}).save("teacher", flat)
    code, _, stderr = run_cli("mine", tiny_beir, "--out", out, "-q", "--no-bm25")
    assert json.loads((out / "manifest.json").read_text())["resumed_stages"] == ["teacher"]
