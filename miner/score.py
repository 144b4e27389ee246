"""Teacher scores for every (query, candidate) and (query, positive) pair."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa

from miner import schema
from miner.models import Embeddings, ModelHandle, in_batches, progress_bar, token_batches, tokenized_lengths
from miner.precision import sample_size
from miner.tables import rows_named
from miner.vectors import row_dots

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

    from miner.cache import TeacherScoreCache


def teacher_pairs(candidates: pa.Table, qrels: pa.Table) -> pa.Table:
    """CANDIDATES + QRELS -> PAIRS: each pair once, positives included (the filter compares to them)."""
    frame = pl.concat(
        [
            pl.from_arrow(candidates.select(["query_id", "doc_id"])),
            pl.from_arrow(qrels.select(["query_id", "doc_id"])),
        ]
    ).unique(maintain_order=True)
    return schema.conform(frame.sort("query_id", "doc_id"), schema.PAIRS)


def _positions(ids: pa.Array | pa.ChunkedArray, name: str) -> pl.DataFrame:
    series = pl.from_arrow(ids)
    assert isinstance(series, pl.Series)
    return pl.DataFrame({name: series.cast(pl.String)}).with_row_index(f"{name}_row")


def bi_encoder_scores(
    pairs: pa.Table,
    query_ids: pa.Array | pa.ChunkedArray,
    query_vectors: np.ndarray,
    doc_ids: pa.Array | pa.ChunkedArray,
    doc_vectors: np.ndarray,
) -> pa.Table:
    """Cosine of normalised embeddings for each pair, reusing the vectors the dense retriever computed."""
    frame = (
        pl.from_arrow(pairs)
        .join(_positions(query_ids, "query_id"), on="query_id", how="left")
        .join(_positions(doc_ids, "doc_id"), on="doc_id", how="left")
    )
    missing = frame.filter(pl.col("query_id_row").is_null() | pl.col("doc_id_row").is_null())
    if missing.height:
        raise schema.SchemaError(f"{missing.height} pairs have no embedding, e.g. {missing.row(0)}")
    scores = row_dots(query_vectors, frame["query_id_row"].to_numpy(), doc_vectors, frame["doc_id_row"].to_numpy())
    return schema.conform(frame.select("query_id", "doc_id").with_columns(teacher_score=scores), schema.TEACHER_SCORES)


# What names a distinct text pair.
PAIR_KEYS = ["query_hash", "passage_hash"]
# Pairs scored between two writes to the teacher cache; a multiple of any sensible batch size.
TEACHER_CHUNK = 8192


def pair_texts(pairs: pa.Table, queries: pa.Table, corpus: pa.Table) -> pl.DataFrame:
    """PAIRS with their texts and text hashes: (query_id, doc_id, query, query_hash, passage, passage_hash)."""
    return (
        pl.from_arrow(pairs)
        .join(
            pl.from_arrow(queries.select(["query_id", "text", "text_hash"])).rename(
                {"text": "query", "text_hash": "query_hash"}
            ),
            on="query_id",
            how="left",
        )
        .join(
            pl.from_arrow(rows_named(corpus, "doc_id", pairs["doc_id"]).select(["doc_id", "text", "text_hash"])).rename(
                {"text": "passage", "text_hash": "passage_hash"}
            ),
            on="doc_id",
            how="left",
        )
    )


def scoring_chunks(
    texts: pl.DataFrame, cache: TeacherScoreCache | None, model_key: str, first: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """(distinct text pairs with the cached scores, chunks of the ones still to score).

    Each distinct (query text, passage text) once, longest first so each batch pads to similar lengths. The
    chunks depend only on what is missing, so a run spread over Dask workers scores exactly the same batches.
    The missing pairs among `first` (query_hash, passage_hash: the precision guard's sample) make a chunk of
    their own, ahead: the batches the guard scored them in, which a run with a cache takes from the cache.
    """
    distinct = (
        texts.unique(PAIR_KEYS, keep="first", maintain_order=True)
        .select("query_hash", "passage_hash", "query", "passage")
        .with_columns(length=pl.col("query").str.len_chars() + pl.col("passage").str.len_chars())
        .sort(["length", "query_hash", "passage_hash"], descending=[True, False, False])
    )
    if cache is not None:
        distinct = cache.lookup(model_key, distinct)
    else:
        distinct = distinct.with_columns(teacher_score=pl.lit(None, pl.Float32))
    todo = distinct.filter(pl.col("teacher_score").is_null())
    ahead = todo.join(first, on=PAIR_KEYS, how="semi") if first is not None else todo.clear()
    if first is not None:
        todo = todo.join(first, on=PAIR_KEYS, how="anti")
    chunks = [todo.slice(start, TEACHER_CHUNK) for start in range(0, todo.height, TEACHER_CHUNK)]
    return distinct, [ahead, *chunks] if ahead.height else chunks


def guard_pairs(texts: pl.DataFrame) -> pl.DataFrame:
    """The precision guard's pairs of `texts` (`pair_texts` rows): the distinct text pairs with the smallest
    hashes, so the same pairs whatever the cache holds."""
    distinct = texts.unique(PAIR_KEYS).sort(PAIR_KEYS)
    return distinct.head(sample_size(distinct.height))


def score_chunk(
    model: CrossEncoder, chunk: pl.DataFrame, *, batch_size: int, advance: Callable[[int], object] | None = None
) -> pl.DataFrame:
    """(query_hash, passage_hash, teacher_score) for one chunk of distinct text pairs.

    Batches are cut by the pairs' token lengths as the model truncates them (`models.token_batches`): at most
    `batch_size` pairs, and a bounded number of padded tokens, which scored about twice as fast as full batches.
    """
    pairs = list(zip(chunk["query"].to_list(), chunk["passage"].to_list(), strict=True))
    predicted = np.zeros(len(pairs), dtype=np.float32)

    def scored(rows: np.ndarray) -> np.ndarray:
        batch = [pairs[row] for row in rows]
        scores = model.predict(batch, batch_size=len(rows), show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32)

    def take(rows: np.ndarray, scores: np.ndarray) -> None:
        if scores.ndim != 1:
            raise ValueError(f"the cross-encoder returns {scores.shape[-1]} scores per pair; a teacher needs one")
        predicted[rows] = scores
        if advance is not None:
            advance(len(rows))

    lengths = pair_lengths(model, chunk)
    shortest = np.array([int(np.argmin(lengths))])
    in_batches(token_batches(lengths, batch_size), scored, take, settle=lambda: scored(shortest))
    return chunk.select("query_hash", "passage_hash").with_columns(teacher_score=predicted)


def pair_lengths(model: CrossEncoder, chunk: pl.DataFrame) -> np.ndarray:
    """Each (query, passage) pair's length in the cross-encoder's tokens, as it truncates them."""
    if chunk.height == 0:
        return np.zeros(0, dtype=np.int64)
    queries, passages = chunk["query"].to_list(), chunk["passage"].to_list()
    cut = {"truncation": "longest_first", "max_length": model.max_seq_length}
    return tokenized_lengths(model.tokenizer, queries, passages, **cut)


def cross_encoder_scores(
    pairs: pa.Table,
    queries: pa.Table,
    corpus: pa.Table,
    model: CrossEncoder | ModelHandle[CrossEncoder],
    *,
    batch_size: int,
    show_progress: bool,
    cache: TeacherScoreCache | None = None,
    model_key: str = "",
    guarded: bool = False,
) -> pa.Table:
    """Cross-encoder scores, batched across queries.

    Pairs the cache holds are not scored at all (the model is then never loaded); each chunk scored goes to
    the cache as it finishes. `guarded`: the precision guard scored its pairs (`guard_pairs`), which are then
    scored in the guard's own batches where the cache lacks them, so the rows do not depend on a cache.
    """
    texts = pair_texts(pairs, queries, corpus)
    first = guard_pairs(texts).select(PAIR_KEYS) if guarded else None
    scores, _ = scored_pairs(
        texts, model, batch_size=batch_size, show_progress=show_progress, cache=cache, model_key=model_key, first=first
    )
    frame = texts.join(scores, on=PAIR_KEYS, how="left")
    return schema.conform(frame.sort("query_id", "doc_id"), schema.TEACHER_SCORES)


def scored_pairs(
    texts: pl.DataFrame,
    model: CrossEncoder | ModelHandle[CrossEncoder],
    *,
    batch_size: int,
    show_progress: bool,
    cache: TeacherScoreCache | None,
    model_key: str,
    first: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, int]:
    """((query_hash, passage_hash, teacher_score) of each distinct pair of `texts`, how many were scored): from
    the cache, or scored and then cached chunk by chunk. `first`: see `scoring_chunks`."""
    distinct, chunks = scoring_chunks(texts, cache, model_key, first)
    scored = [distinct.filter(pl.col("teacher_score").is_not_null()).select(*PAIR_KEYS, "teacher_score")]
    handle = ModelHandle.of(model)
    to_score = sum(chunk.height for chunk in chunks)
    with progress_bar("Scoring pairs", to_score, show_progress, unit="pair") as bar:
        for chunk in chunks:
            fresh = score_chunk(
                handle.model, chunk, batch_size=batch_size, advance=bar.update if bar is not None else None
            )
            if cache is not None:
                cache.store(model_key, fresh)
            scored.append(fresh)
    return pl.concat(scored), to_score


def positive_geometry(pool: pa.Table, qrels: pa.Table, queries: Embeddings, documents: Embeddings) -> pa.Table:
    """Where each candidate sits relative to its query and its query's positives, in the embedding model's space.

    -> (query_id, doc_id, query_cosine, positive_cosine):
    - query_cosine: cosine with the query, whatever the teacher: the filter's ruler of hardness.
    - positive_cosine: cosine with the nearest positive. The positives tell what the query's author counted
      as relevant; a candidate close to one is a likely unlabelled positive, near 1 a near-copy.
    """
    q_rows = _positions(queries.ids, "query_id")
    d_rows = _positions(documents.ids, "doc_id")
    positives = (
        pl.from_arrow(qrels.select(["query_id", "doc_id"]))
        .join(d_rows, on="doc_id", how="inner")
        .join(q_rows, on="query_id", how="inner")
    )
    frame = (
        pl.from_arrow(pool.select(["query_id", "doc_id"]))
        .join(q_rows, on="query_id", how="left")
        .join(d_rows, on="doc_id", how="left")
    )
    query_cosines = row_dots(
        queries.vectors, frame["query_id_row"].to_numpy(), documents.vectors, frame["doc_id_row"].to_numpy()
    )
    # Nearest positive: one row per (candidate, positive of its query), then the max per candidate.
    pairs = frame.with_row_index("candidate").join(
        positives.select("query_id", positive_row="doc_id_row"), on="query_id", how="inner"
    )
    cosines = row_dots(
        documents.vectors, pairs["doc_id_row"].to_numpy(), documents.vectors, pairs["positive_row"].to_numpy()
    )
    nearest = np.full(frame.height, -1.0, dtype=np.float32)
    np.maximum.at(nearest, pairs["candidate"].to_numpy(), cosines.astype(np.float32))
    return pa.table(
        {
            "query_id": frame["query_id"].to_arrow(),
            "doc_id": frame["doc_id"].to_arrow(),
            "query_cosine": query_cosines.astype(np.float32),
            "positive_cosine": nearest,
        }
    )
