"""Candidates: BM25 (pyserini/Lucene) and dense (faiss) top-k, merged into one candidate pool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from miner import schema
from miner.java import start_jvm

QUERY_BATCH = 4096


def _batches(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)


def ranked(frame: pl.DataFrame) -> pa.Table:
    """(query_id, doc_id, score) -> RETRIEVED, ranking by score then doc_id so ties never depend on order."""
    return schema.conform(
        frame.sort(["query_id", "score", "doc_id"], descending=[False, True, False]).with_columns(
            rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id")
        ),
        schema.RETRIEVED,
    )


# --- BM25 -------------------------------------------------------------------------------------------


def build_bm25_index(corpus: pa.Table, index_dir: Path, *, threads: int, batch_size: int = 10_000) -> None:
    """Index CORPUS rows into a Lucene index at `index_dir` (Anserini's default English analyser)."""
    start_jvm()
    from pyserini.index.lucene import LuceneIndexer

    indexer = LuceneIndexer(str(index_dir), threads=threads)
    try:
        for batch in _batches(corpus.select(["doc_id", "text"]), batch_size):
            ids, texts = batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()
            indexer.add_batch_dict([{"id": i, "contents": t} for i, t in zip(ids, texts, strict=True)])
    finally:
        indexer.close()


def bm25_search(
    index_dir: Path, queries: pa.Table, *, k: int, threads: int, k1: float = 0.9, b: float = 0.4
) -> pa.Table:
    """QUERIES -> RETRIEVED: BM25 top-k per query, searched `threads` at a time inside Lucene."""
    start_jvm()
    from pyserini.search.lucene import LuceneSearcher

    searcher = LuceneSearcher(str(index_dir))
    searcher.set_bm25(k1, b)
    query_ids: list[str] = []
    doc_ids: list[str] = []
    scores: list[float] = []
    try:
        for batch in _batches(queries, QUERY_BATCH):
            hits = searcher.batch_search(
                batch.column("text").to_pylist(), batch.column("query_id").to_pylist(), k=k, threads=threads
            )
            for query_id, results in hits.items():
                for hit in results:
                    query_ids.append(query_id)
                    doc_ids.append(hit.docid)
                    scores.append(hit.score)
    finally:
        searcher.close()
    return ranked(
        pl.DataFrame(
            {"query_id": query_ids, "doc_id": doc_ids, "score": scores},
            schema={"query_id": pl.String, "doc_id": pl.String, "score": pl.Float32},
        )
    )


# --- dense ------------------------------------------------------------------------------------------


def dense_search(
    query_ids: pa.Array | pa.ChunkedArray,
    query_vectors: np.ndarray,
    doc_ids: pa.Array | pa.ChunkedArray,
    doc_vectors: np.ndarray,
    *,
    k: int,
    threads: int,
) -> pa.Table:
    """Exact inner-product search (cosine on normalised vectors) with faiss -> RETRIEVED."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(doc_vectors)
    k = min(k, len(doc_ids))
    rows, scores = [], []
    for start in range(0, len(query_vectors), QUERY_BATCH):
        batch_scores, batch_rows = index.search(query_vectors[start : start + QUERY_BATCH], k)
        rows.append(batch_rows)
        scores.append(batch_scores)
    found = np.concatenate(rows) if rows else np.zeros((0, k), dtype=np.int64)
    similarity = np.concatenate(scores) if scores else np.zeros((0, k), dtype=np.float32)
    flat = found.reshape(-1)
    valid = flat >= 0  # faiss pads with -1 when it finds fewer than k
    query_rows = np.repeat(np.arange(len(query_vectors)), k)[valid]
    frame = pl.DataFrame(
        {
            "query_id": _series(query_ids).gather(query_rows),
            "doc_id": _series(doc_ids).gather(flat[valid]),
            "score": similarity.reshape(-1)[valid].astype(np.float32),
        }
    )
    return ranked(frame)


def _series(values: pa.Array | pa.ChunkedArray) -> pl.Series:
    series = pl.from_arrow(values)
    assert isinstance(series, pl.Series)
    return series.cast(pl.String)


# --- the pool ---------------------------------------------------------------------------------------


def candidate_pool(bm25: pa.Table | None, dense: pa.Table | None, *, rrf_k: int = 60) -> pa.Table:
    """Two RETRIEVED lists (either may be None) -> CANDIDATES, fused by reciprocal rank fusion."""
    empty = pl.DataFrame(schema={"query_id": pl.String, "doc_id": pl.String, "rank": pl.Int32, "score": pl.Float32})

    def prefixed(table: pa.Table | None, name: str) -> pl.DataFrame:
        frame = pl.from_arrow(table) if table is not None else empty
        assert isinstance(frame, pl.DataFrame)
        return frame.rename({"rank": f"{name}_rank", "score": f"{name}_score"})

    pool = prefixed(bm25, "bm25").join(prefixed(dense, "dense"), on=["query_id", "doc_id"], how="full", coalesce=True)
    reciprocal = [(1.0 / (rrf_k + pl.col(f"{name}_rank"))).fill_null(0.0) for name in ("bm25", "dense")]
    pool = (
        pool.with_columns(
            fused_score=reciprocal[0] + reciprocal[1],
            source=pl.when(pl.col("bm25_rank").is_not_null() & pl.col("dense_rank").is_not_null())
            .then(pl.lit("both"))
            .when(pl.col("bm25_rank").is_not_null())
            .then(pl.lit("bm25"))
            .otherwise(pl.lit("dense")),
        )
        .sort(["query_id", "fused_score", "doc_id"], descending=[False, True, False])
        .with_columns(fused_rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("query_id"))
    )
    return schema.conform(pool, schema.CANDIDATES)
