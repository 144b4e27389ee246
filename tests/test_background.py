from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from miner.background import finished, result_of, side_by_side

# BM25 over Cranfield, every query 20 times at depth 1,000 (about 20 s of Lucene), searched on daemon threads
# while the main thread waits: Ctrl-C a second in must end it at once. Measured without the waits' naps, the
# KeyboardInterrupt came only when the search was over (22.7 s).
SEARCH_THEN_INTERRUPTED = textwrap.dedent(
    """
    import os, signal, sys, tempfile, threading, time
    from pathlib import Path
    import pyarrow as pa
    from miner import candidates, java
    from miner.ingest import ingest

    data = ingest(Path(sys.argv[1]))
    java.expect_job(2000)
    index = Path(tempfile.mkdtemp()) / "index"
    candidates.build_bm25_index(data.corpus, index, threads=2)
    queries = pa.concat_tables([data.queries] * 20)
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    try:
        candidates.bm25_search(index, queries, k=1000, threads=2)
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - started:.1f} s", flush=True)
        sys.exit(0)
    sys.exit(1)
    """
)


def test_ctrl_c_ends_a_wait_on_bm25_search_at_once(cranfield: Path) -> None:
    ended = subprocess.run(
        [sys.executable, "-c", SEARCH_THEN_INTERRUPTED, str(cranfield)], capture_output=True, text=True, timeout=60
    )
    assert ended.returncode == 0, ended.stderr
    assert float(ended.stdout.split()[2]) < 5, ended.stdout


def test_side_by_side_keeps_the_order_runs_on_daemon_threads_and_passes_errors_on() -> None:
    seen: list[bool] = []

    def work(item: int) -> int:
        seen.append(threading.current_thread().daemon)
        if item < 0:
            raise ValueError(item)
        return item * 10

    assert side_by_side(work, [3, 1, 2], "test") == [30, 10, 20]
    assert seen == [True, True, True]
    try:
        side_by_side(work, [1, -1], "test")
    except ValueError as error:
        assert error.args == (-1,)
    else:
        raise AssertionError("the error was lost")


def test_result_of_a_finished_future() -> None:
    assert result_of(finished(7)) == 7
