"""Candidate retrieval at scale: the faiss index choice (exact, HNSW, IVF) and streaming BM25 indexing.

Real faiss on random unit vectors and on the bundled model's embeddings of the small Cranfield cut; real
Lucene through Anserini. No timings here: speed and memory are measured by bench/scale.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from miner.candidates import DenseIndexSpec, bm25_search, build_bm25_index, dense_retrieve, dense_search
from miner.errors import InputError
from miner.ingest import ingest
from miner.java import java_heap, start_jvm

DOCS, QUERIES, DIM, K = 4000, 150, 48, 10


def unit_vectors(rows: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def random_set() -> tuple[pa.Array, np.ndarray, pa.Array, np.ndarray]:
    query_ids = pa.array([f"q{i}" for i in range(QUERIES)])
    doc_ids = pa.array([f"d{i}" for i in range(DOCS)])
    return query_ids, unit_vectors(QUERIES, 1), doc_ids, unit_vectors(DOCS, 2)


def exact_top_k(query_vectors: np.ndarray, doc_vectors: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(query_vectors @ doc_vectors.T), axis=1, kind="stable")[:, :k]


def measured_recall(retrieved: pa.Table, query_vectors: np.ndarray, doc_vectors: np.ndarray, k: int) -> float:
    """recall@k of a RETRIEVED table against numpy's brute force, over every query."""
    hits = pl.from_arrow(retrieved).with_columns(row=pl.col("doc_id").str.slice(1).cast(pl.Int64))
    expected = exact_top_k(query_vectors, doc_vectors, k)
    found = 0
    for query, wanted in enumerate(expected):
        got = hits.filter(pl.col("query_id") == f"q{query}")["row"].to_numpy()
        found += np.intersect1d(got, wanted).size
    return found / expected.size


def test_auto_below_the_threshold_is_the_exact_search(random_set, tmp_path: Path) -> None:
    query_ids, queries, doc_ids, docs = random_set
    exact = dense_search(query_ids, queries, doc_ids, docs, k=K, threads=2)
    table, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, cache_dir=tmp_path)
    assert info == {"kind": "flat", "requested": "auto", "documents": DOCS, "exact": True}
    assert table.equals(exact)
    assert measured_recall(exact, queries, docs, K) == 1.0
    assert not list(tmp_path.iterdir())  # nothing to cache for an exact search


def test_auto_above_the_threshold_uses_hnsw_and_reports_its_measured_recall(random_set) -> None:
    query_ids, queries, doc_ids, docs = random_set
    # Every query in the recall sample, so the reported recall must be the recall of the returned hits.
    spec = DenseIndexSpec(ann_threshold=DOCS - 1, recall_queries=QUERIES)
    table, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec)
    assert (info["kind"], info["requested"], info["exact"]) == ("hnsw", "auto", False)
    assert (info["hnsw_m"], info["hnsw_ef_search"], info["recall_queries"], info["k"]) == (32, 256, QUERIES, K)
    assert info["recall_at_k"] == pytest.approx(measured_recall(table, queries, docs, K), abs=1e-4)
    assert info["recall_at_k"] >= 0.95  # HNSW with efSearch 256 over 4,000 vectors misses little


def test_ivf_reports_the_recall_it_lost(random_set) -> None:
    query_ids, queries, doc_ids, docs = random_set
    # Two of ~100 lists probed: recall well below 1 on structureless random vectors, and reported as such.
    spec = DenseIndexSpec(kind="ivf", ivf_nprobe=2, recall_queries=QUERIES)
    table, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec)
    assert (info["kind"], info["ivf_nlist"], info["ivf_nprobe"]) == ("ivf", 102, 2)
    assert info["recall_at_k"] == pytest.approx(measured_recall(table, queries, docs, K), abs=1e-4)
    assert 0 < info["recall_at_k"] < 0.9


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_an_approximate_index_is_the_same_every_build(random_set, kind: str) -> None:
    query_ids, queries, doc_ids, docs = random_set
    spec = DenseIndexSpec(kind=kind, recall_queries=0)
    first, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec)
    again, _ = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec)
    assert first.equals(again)
    assert "recall_at_k" not in info  # not measured when asked not to


def test_the_index_is_saved_reused_and_rebuilt_when_damaged(
    random_set, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    query_ids, queries, doc_ids, docs = random_set
    spec = DenseIndexSpec(kind="hnsw", recall_queries=50)
    built, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec, cache_dir=tmp_path)
    assert info["reused_from_cache"] is False
    (saved,) = tmp_path.glob("hnsw-*.faiss")
    written = saved.stat().st_mtime_ns

    reused, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec, cache_dir=tmp_path)
    assert info["reused_from_cache"] is True
    assert saved.stat().st_mtime_ns == written
    assert reused.equals(built)

    # A search-time setting is not part of the index: the saved one serves it.
    wider = DenseIndexSpec(kind="hnsw", hnsw_ef_search=300, recall_queries=0)
    _, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=wider, cache_dir=tmp_path)
    assert (info["reused_from_cache"], info["hnsw_ef_search"]) == (True, 300)

    # Other vectors, another index beside it.
    other = docs[::-1].copy()
    _, info = dense_retrieve(query_ids, queries, doc_ids, other, k=K, threads=2, spec=spec, cache_dir=tmp_path)
    assert info["reused_from_cache"] is False
    assert len(list(tmp_path.glob("hnsw-*.faiss"))) == 2

    for damage in ("flip", "truncate"):
        data = bytearray(saved.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 3 :]
        saved.write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="miner.candidates"):
            rebuilt, info = dense_retrieve(
                query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec, cache_dir=tmp_path
            )
        assert info["reused_from_cache"] is False
        assert any("failed its checksum" in record.getMessage() for record in caplog.records), damage
        assert rebuilt.equals(built)
        _, info = dense_retrieve(query_ids, queries, doc_ids, docs, k=K, threads=2, spec=spec, cache_dir=tmp_path)
        assert info["reused_from_cache"] is True  # the rebuilt index was saved in place of the damaged one


def test_cli_dense_index_hnsw_writes_its_recall_to_the_manifest(small_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "mine",
        small_beir,
        "--out",
        out,
        "-q",
        "--engine",
        "local",
        "--no-bm25",
        "--dense-index",
        "hnsw",
        "--dense-k",
        "100",
    )
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    dense_index = manifest["counts"]["dense_index"]
    assert dense_index["kind"] == "hnsw" and dense_index["requested"] == "hnsw"
    assert dense_index["documents"] == manifest["counts"]["ingest"]["documents"]
    # Fewer queries than the sample size of 200: every query is measured.
    assert dense_index["recall_queries"] == manifest["counts"]["ingest"]["queries_with_positives"] == 20
    assert dense_index["k"] == 100
    # Real MiniLM embeddings of a few hundred passages: HNSW finds (nearly) all of the exact top 100.
    assert 0.95 <= dense_index["recall_at_k"] <= 1.0
    assert manifest["config"]["retrieval"]["dense_index"] == "hnsw"


def test_cli_refuses_an_unknown_dense_index(small_beir: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli("mine", small_beir, "--out", tmp_path / "out", "--dense-index", "annoy")
    assert code == 2
    assert stderr.startswith("error: --dense-index: Input should be") and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --- streaming BM25 index -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(small_beir: Path):
    return ingest(small_beir)


def test_bm25_index_built_from_parquet_batches_equals_the_one_built_from_a_table(small, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert build_bm25_index(small.corpus, whole, threads=2) == small.corpus.num_rows
    shard = tmp_path / "corpus.parquet"
    pq.write_table(small.corpus, shard, row_group_size=64)
    streamed = tmp_path / "streamed"
    batches = pq.ParquetFile(shard).iter_batches(batch_size=50, columns=["doc_id", "text"])
    # A commit after every batch: the index is closed and reopened many times on the way.
    indexed = build_bm25_index(batches, streamed, threads=2, batch_size=30, commit_bytes=1)
    assert indexed == small.corpus.num_rows
    expected = bm25_search(whole, small.queries, k=20, threads=2)
    assert bm25_search(streamed, small.queries, k=20, threads=2).equals(expected)


def test_bm25_index_keeps_texts_that_need_json_escaping(tmp_path: Path) -> None:
    texts = ['say "lift" twice', "back\\slash and tab\there", "line\nbreak", "naïve façade ☃ 翼", "\u2028 sep"]
    corpus = pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts})
    assert build_bm25_index(corpus, tmp_path / "index", threads=1) == len(texts)
    queries = pa.table({"query_id": ["a", "b", "c"], "text": ["lift", "façade", "break"]})
    hits = pl.from_arrow(bm25_search(tmp_path / "index", queries, k=1, threads=1))
    assert dict(zip(hits["query_id"], hits["doc_id"], strict=True)) == {"a": "d0", "b": "d3", "c": "d2"}


def test_the_jvm_heap_is_capped() -> None:
    start_jvm()
    from jnius import autoclass

    maximum = autoclass("java.lang.Runtime").getRuntime().maxMemory()
    # -Xmx2g, not a quarter of the machine's memory (the JVM reports a little less than what it was given).
    assert 1.5 * 2**30 < maximum <= 2 * 2**30


def test_a_bad_heap_setting_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINER_JAVA_HEAP", "lots")
    with pytest.raises(InputError) as error:
        java_heap()
    assert str(error.value) == "MINER_JAVA_HEAP: 'lots' is not a Java heap size; give e.g. 2g or 3072m"
    monkeypatch.setenv("MINER_JAVA_HEAP", "3072m")
    assert java_heap() == "3072m"
    monkeypatch.delenv("MINER_JAVA_HEAP")
    assert java_heap() == "2g"
