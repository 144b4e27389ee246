"""The flow on a real Dask cluster: a LocalCluster of two worker processes reporting to one Prefect API."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli

pytestmark = pytest.mark.usefixtures("prefect_server")


def _task_runs(api: str, name: str) -> list[dict]:
    import httpx

    found = httpx.post(f"{api}/task_runs/filter", json={"task_runs": {"name": {"like_": name}}}, timeout=30)
    found.raise_for_status()
    return found.json()


def test_two_dask_workers_write_the_same_rows_as_one_process(
    tiny_beir: Path, tiny_cross_encoder: Path, tmp_path: Path, prefect_server: str
) -> None:
    # The sharded stages are encoding, BM25 and exact dense search, and cross-encoder scoring: use them all,
    # with no cache shared between runs.
    common = [tiny_beir, "-q", "--no-cache", "--cross-encoder", tiny_cross_encoder, "--num-negatives", "3"]
    code, _, err = run_cli("mine", *common, "--out", tmp_path / "local", "--engine", "local")
    assert code == 0, err
    code, _, err = run_cli("mine", *common, "--out", tmp_path / "dask", "--workers", "2")
    assert code == 0, err
    for name in ("negatives.parquet", "triplets.parquet", "ntuples.parquet"):
        single, spread = (pq.read_table(tmp_path / run / name) for run in ("local", "dask"))
        assert single.num_rows > 0
        assert spread.equals(single), name  # row for row, scores to the last bit
    assert not (tmp_path / ".dask.miner-work").exists()  # shards and their scratch cache are gone
    # Each ran as Prefect tasks on the cluster, and each of them completed.
    for shard in ("encode-document", "bm25-search", "dense-search", "teacher-shard"):
        states = {run["state_type"] for run in _task_runs(prefect_server, shard)}
        assert states == {"COMPLETED"}, (shard, states)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_scheduler_is_named_within_30_seconds(tiny_beir: Path, tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "miner.cli",
            "mine",
            str(tiny_beir),
            "--out",
            str(tmp_path / "o"),
            "--dask-address",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert address in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
