"""The sharded stages: encoding, exact dense search and cross-encoder scoring, spread over workers (Dask
through Prefect).

A shard is one chunk of the same plan the single-process run follows (`models.encoding_chunks`,
`candidates.query_shards`, `score.scoring_chunks`), so a distributed run computes exactly the same batches and
exactly the same floats. Shards travel as files on a shared path; a task returns a count, never a table.
Encoding and scoring land in the shared cache, and the stage that follows finds everything there, exactly as a
warm re-run does; search shards are read back and put together in query order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from miner.atomic import atomic_write
from miner.cache import EmbeddingCache, TeacherScoreCache
from miner.candidates import bm25_search, query_shards, ranked
from miner.models import (
    ModelRef,
    encode_chunk,
    encoding_chunks,
    load_cross_encoder,
    load_embedding_model,
    model_key,
)
from miner.score import pair_texts, score_chunk, scoring_chunks
from miner.vectors import backing_file, exact_top_k, stacked

# (stage name, function, list of argument tuples) -> list of results, one per tuple, in order.
ShardRunner = Callable[[str, Callable[..., Any], list[tuple[Any, ...]]], list[Any]]


def map_directly(name: str, function: Callable[..., Any], items: list[tuple[Any, ...]]) -> list[Any]:
    return [function(*item) for item in items]


@functools.cache
def _embedding_model(ref: ModelRef, threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return load_embedding_model(ref, show_progress=False)


@functools.cache
def _cross_encoder(ref: ModelRef, threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return load_cross_encoder(ref, show_progress=False)


def encode_shard(
    ref: ModelRef, shard: str, kind: str, batch_size: int, cache_dir: str, model_key: str, threads: int
) -> int:
    """Encode one shard's texts into the cache; runs on a worker, which keeps its model between shards."""
    table = pq.read_table(shard)
    vectors, over = encode_chunk(_embedding_model(ref, threads), table["text"], kind=kind, batch_size=batch_size)
    EmbeddingCache(Path(cache_dir), precision=ref.precision).store(
        model_key, kind, table["text_hash"].to_pylist(), vectors, over
    )
    return table.num_rows


def score_shard(ref: ModelRef, shard: str, batch_size: int, cache_dir: str, model_key: str, threads: int) -> int:
    """Score one shard of distinct text pairs into the teacher cache."""
    chunk = pl.read_parquet(shard)
    scored = score_chunk(_cross_encoder(ref, threads), chunk, batch_size=batch_size)
    TeacherScoreCache(Path(cache_dir), precision=ref.precision).store(model_key, scored)
    return chunk.height


def search_shard(query_vectors: str, doc_vectors: str, start: int, stop: int, k: int, threads: int, out: str) -> int:
    """Exact top-k of one query shard over every document, read from the `.npy` files a block at a time."""
    import faiss

    faiss.omp_set_num_threads(threads)
    queries = np.load(query_vectors, mmap_mode="r")[start:stop]
    scores, rows = exact_top_k(queries, np.load(doc_vectors, mmap_mode="r"), k)
    with atomic_write(Path(out)) as temporary, temporary.open("wb") as handle:
        np.savez(handle, scores=scores, rows=rows)
    return stop - start


def bm25_shard(
    index_dir: str, shard: str, k: int, k1: float, b: float, threads: int, out: str, language: str = "en"
) -> int:
    """BM25 top-k of one query shard over the index at a shared path (each worker starts its own JVM)."""
    queries = pq.read_table(shard)
    retrieved = bm25_search(Path(index_dir), queries, k=k, threads=threads, k1=k1, b=b, language=language)
    with atomic_write(Path(out)) as temporary:
        pq.write_table(retrieved, temporary)
    return retrieved.num_rows


@dataclass(frozen=True)
class Workers:
    """Where shards run and meet: the runner, a scratch folder and a cache folder every worker sees."""

    shards: ShardRunner
    scratch: Path
    cache_dir: Path
    threads: int  # torch threads per worker


def prefill_embeddings(table: pa.Table, *, kind: str, ref: ModelRef, batch_size: int, workers: Workers) -> int:
    """Encode what `table` lacks in the cache, one shard per chunk; returns how many texts were encoded."""
    key = model_key(ref)
    _, found, _ = EmbeddingCache(workers.cache_dir).lookup(key, kind, table.column("text_hash"), allocate=None)
    rows_of, chunks = encoding_chunks(table, found)
    workers.scratch.mkdir(parents=True, exist_ok=True)
    items = []
    for number, chunk in enumerate(chunks):
        path = workers.scratch / f"encode-{kind}-{number:05d}.parquet"
        rows = pa.array([rows_of[text_hash][0] for text_hash in chunk])
        pq.write_table(table.select(["text_hash", "text"]).take(rows), path)
        items.append((ref, str(path), kind, batch_size, str(workers.cache_dir), key, workers.threads))
    return sum(workers.shards(f"encode-{kind}", encode_shard, items))


def prefill_teacher_scores(
    pairs: pa.Table, queries: pa.Table, corpus: pa.Table, *, ref: ModelRef, batch_size: int, workers: Workers
) -> int:
    """Score the distinct text pairs the teacher cache lacks, one shard per chunk; returns how many."""
    key = model_key(ref)
    _, chunks = scoring_chunks(pair_texts(pairs, queries, corpus), TeacherScoreCache(workers.cache_dir), key)
    workers.scratch.mkdir(parents=True, exist_ok=True)
    items = []
    for number, chunk in enumerate(chunks):
        path = workers.scratch / f"teacher-{number:05d}.parquet"
        chunk.write_parquet(path)
        items.append((ref, str(path), batch_size, str(workers.cache_dir), key, workers.threads))
    return sum(workers.shards("teacher-shard", score_shard, items))


def sharded_exact_search(
    query_vectors: np.ndarray, doc_vectors: np.ndarray, k: int, *, workers: Workers
) -> tuple[np.ndarray, np.ndarray]:
    """`candidates.exact_search` with its query shards on the workers; vectors go to them as `.npy` paths."""
    workers.scratch.mkdir(parents=True, exist_ok=True)
    paths = []
    for side, vectors in (("query", query_vectors), ("document", doc_vectors)):
        path = backing_file(vectors)
        if path is None:
            path = workers.scratch / f"search-{side}.npy"
            np.save(path, vectors)
        paths.append(str(path))
    items = [
        (*paths, start, stop, k, workers.threads, str(workers.scratch / f"search-{number:05d}.npz"))
        for number, (start, stop) in enumerate(query_shards(len(query_vectors)))
    ]
    workers.shards("dense-search", search_shard, items)
    parts = []
    for item in items:
        with np.load(item[-1], allow_pickle=False) as shard:
            parts.append((shard["scores"], shard["rows"]))
    return stacked(parts, k)


def sharded_bm25_search(
    index_dir: Path, *, queries: pa.Table, k: int, k1: float, b: float, workers: Workers, language: str = "en"
) -> pa.Table:
    """`candidates.bm25_search` with its query shards on the workers; the same rows, in the same order."""
    workers.scratch.mkdir(parents=True, exist_ok=True)
    items = []
    for number, (start, stop) in enumerate(query_shards(queries.num_rows)):
        path = workers.scratch / f"bm25-queries-{number:05d}.parquet"
        pq.write_table(queries.select(["query_id", "text"]).slice(start, stop - start), path)
        out = workers.scratch / f"bm25-{number:05d}.parquet"
        items.append((str(index_dir), str(path), k, k1, b, workers.threads, str(out), language))
    workers.shards("bm25-search", bm25_shard, items)
    found = [pl.read_parquet(item[6]) for item in items]
    if not found:
        return bm25_search(index_dir, queries, k=k, threads=workers.threads, k1=k1, b=b, language=language)
    return ranked(pl.concat(found).select("query_id", "doc_id", "score"))


def check_scheduler_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse at once, naming it, a Dask scheduler address nothing answers on (instead of a long hang)."""
    import socket
    from urllib.parse import urlsplit

    from miner.errors import InputError

    parts = urlsplit(address)
    try:
        host, port = parts.hostname, parts.port or 8786
    except ValueError:
        host, port = None, None
    if not host:
        raise InputError("--dask-address", f"'{address}' names no host", "write it as tcp://host:8786")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise InputError(
            "--dask-address",
            f"no Dask scheduler answers at {address} ({error.strerror or type(error).__name__})",
            "start the scheduler (`dask scheduler`) or check the address; --workers N starts a local cluster instead",
        ) from None
