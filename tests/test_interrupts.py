"""Ctrl-C and SIGTERM: a CLI process interrupted at many moments ends with one line and 128 + the signal's number,
leaves nothing partial and no JVM crash file, releases its lock, and the same command then gives the same rows."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_nothing_partial, assert_rerun_gives, run_cli, wait_for

from miner.lock import lock_path
from miner.resume import work_dir

# Checkpointed stages after which a trial interrupts the run: the JVM's start and BM25 lie before `bm25`,
# encoding before `embed`, scoring before `teacher`.
AFTER = ("bm25", "embed", "teacher", "geometry", "filter", "sample")
RANDOM_TRIALS = 2


def _command(data: Path, out: Path, cache: Path) -> list[str]:
    return ["mine", str(data), "--out", str(out), "--cache-dir", str(cache), "-q"]


def _start(data: Path, out: Path, cache: Path, cwd: Path, api_url: str | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return subprocess.Popen(
        [sys.executable, "-m", "miner.cli", *_command(data, out, cache)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _reach(moment: str, out: Path, process: subprocess.Popen[str]) -> bool:
    if moment == "ingest":
        return wait_for(work_dir(out), process)  # ingest spills its tables there first
    if moment.startswith("after "):
        return wait_for(work_dir(out) / f"{moment.removeprefix('after ')}.done.json", process)
    if moment == "writing outputs":
        # The previous trial's files are there: without them, the first file written marks the moment.
        for name in ("manifest.json", "negatives.parquet"):
            (out / name).unlink(missing_ok=True)
        return wait_for(out / "negatives.parquet", process)
    return True


def _trials(tiny_beir: Path, tmp_path: Path, moments: list[tuple[str, float]], signum: int, api_url: str | None) -> int:
    """Interrupt one run per moment, check what it left, resume it; the number interrupted while working."""
    reference = pq.read_table(tmp_path / "reference" / "negatives.parquet")
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    in_flight = 0
    for trial, (moment, delay) in enumerate(moments):
        cache = tmp_path / f"cache-{signum}-{trial}"  # cold, so that encoding itself can be interrupted
        process = _start(tiny_beir, out, cache, cwd, api_url)
        reached = _reach(moment, out, process)
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        if process.returncode == 0:
            # The signal came once the run was done, while the interpreter exited: the outputs are complete.
            assert (out / "manifest.json").is_file(), f"trial {trial} ({moment})"
        else:
            in_flight += 1
            assert process.returncode == 128 + signum, f"trial {trial} ({moment}): {stderr}"
            assert stderr.splitlines() == [
                f"error: interrupted by {signal.Signals(signum).name}; run the same command again to resume "
                "(finished stages are kept)"
            ], f"trial {trial} ({moment}): {stderr}"
        assert reached, f"trial {trial} ({moment}): the run ended before that point"
        crash_files = [*cwd.glob("hs_err_pid*"), *tmp_path.glob("hs_err_pid*"), *Path.cwd().glob("hs_err_pid*")]
        assert not crash_files, crash_files
        assert not lock_path(out).exists(), f"trial {trial} ({moment}): lock left behind"
        assert_nothing_partial(out)

        assert_rerun_gives(reference, _command(tiny_beir, out, cache), out, f"trial {trial} ({moment})")
    return in_flight


@pytest.fixture
def reference(tiny_beir: Path, tmp_path: Path) -> float:
    """An uninterrupted run's rows in tmp_path/reference; returns how long it took, to spread random moments."""
    started = time.monotonic()
    code, _, stderr = run_cli(*_command(tiny_beir, tmp_path / "reference", tmp_path / "cache-reference"))
    assert code == 0, stderr
    return time.monotonic() - started


def test_sigint_at_ten_moments_ends_with_one_line_and_resumes_to_the_same_rows(
    tiny_beir: Path, tmp_path: Path, reference: float
) -> None:
    rng = random.Random(20261130)
    moments = [("ingest", 0.0)]
    moments += [(f"after {stage}", rng.uniform(0, 0.03)) for stage in AFTER]
    moments.append(("writing outputs", 0.0))
    moments += [("at random", rng.uniform(0.5, reference)) for _ in range(RANDOM_TRIALS)]
    in_flight = _trials(tiny_beir, tmp_path, moments, signal.SIGINT, api_url=None)
    # Most signals must land while the run was working, or the trials test nothing.
    assert in_flight >= len(moments) - 2


def test_sigterm_under_prefect_ends_with_one_line_and_resumes_to_the_same_rows(
    tiny_beir: Path, tmp_path: Path, reference: float, prefect_server: str
) -> None:
    # Prefect installs a SIGTERM handler of its own while a flow runs: the run must still end as ours do.
    moments = [("after bm25", 0.0), ("after embed", 0.0), ("writing outputs", 0.0)]
    in_flight = _trials(tiny_beir, tmp_path, moments, signal.SIGTERM, api_url=prefect_server)
    assert in_flight >= len(moments) - 1


def test_ctrl_c_of_a_dask_run_stops_its_workers_and_server_and_ends_with_one_line(
    tiny_beir: Path, tmp_path: Path
) -> None:
    # Ctrl-C in a terminal signals the whole process group: the run, its Dask workers and its temporary Prefect
    # server. No PREFECT_API_URL, so the run starts that server itself.
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    command = ["mine", str(tiny_beir), "--out", str(out), "-q", "--no-cache", "--workers", "2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "miner.cli", *command],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert wait_for(work_dir(out) / "shards", process), "the run ended before it sent shards to the workers"
    os.killpg(process.pid, signal.SIGINT)
    try:
        # Generous, but short of the minute a flow spent retrying its reports to a server that died with the group.
        _, stderr = process.communicate(timeout=45)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the test failed: leave no run behind
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1].startswith("error: interrupted by SIGINT; ")
    assert not [line for line in stderr.splitlines() if "Traceback" in line or "Error" in line], stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break  # no worker, nanny or server is left
        time.sleep(0.2)
    else:
        pytest.fail("processes of the interrupted run are still running")
    assert not lock_path(out).exists() and not list(tmp_path.glob("hs_err_pid*"))
    assert_nothing_partial(out)
