"""The contract between stages: every table a stage takes or returns has one of these schemas.

Stages are plain functions from tables to tables; `conform` is called where a table crosses a
stage boundary, so a stage that drifts from its contract fails loudly at the boundary instead of
two stages later.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

_str = pa.string()

# Normalised inputs. `text_hash` is a content hash of the whitespace-normalised text: two rows with
# the same hash are the same passage, whatever their ids.
CORPUS = pa.schema([("doc_id", _str), ("text", _str), ("text_hash", _str)])
QUERIES = pa.schema([("query_id", _str), ("text", _str), ("text_hash", _str)])
# Only positive judgements are kept: relevance >= the configured minimum.
QRELS = pa.schema([("query_id", _str), ("doc_id", _str), ("relevance", pa.int32())])

# One retriever's ranked list: rank is 1-based, ties broken by doc_id.
RETRIEVED = pa.schema([("query_id", _str), ("doc_id", _str), ("rank", pa.int32()), ("score", pa.float32())])

# The merged pool: each retriever's rank/score (null when it did not return the document), the
# reciprocal-rank-fusion score and rank, and which retrievers found it.
CANDIDATES = pa.schema(
    [
        ("query_id", _str),
        ("doc_id", _str),
        ("bm25_rank", pa.int32()),
        ("bm25_score", pa.float32()),
        ("dense_rank", pa.int32()),
        ("dense_score", pa.float32()),
        ("fused_score", pa.float64()),
        ("fused_rank", pa.int32()),
        ("source", _str),
    ]
)

# Pairs the teacher must score, and its scores.
PAIRS = pa.schema([("query_id", _str), ("doc_id", _str)])
TEACHER_SCORES = pa.schema([("query_id", _str), ("doc_id", _str), ("teacher_score", pa.float32())])

# Every candidate with its verdict: `dropped_by` names the first rule that removed it (null = kept).
# `teacher_rank` is the 1-based rank by teacher score among the query's candidates that are not
# positives nor copies of one; `positive_reference` is the score the positive-aware rule compared to.
JUDGED = pa.schema(
    [
        *CANDIDATES,
        ("teacher_score", pa.float32()),
        ("teacher_rank", pa.int32()),
        ("positive_reference", pa.float32()),
        ("dropped_by", _str),
        # 0: kept; k > 0: dropped by the rank window but admissible at coverage-fallback step k; null: dropped.
        ("fallback_step", pa.int32()),
    ]
)

# The sampler's choice: ids and scores only; texts are joined in at export.
SELECTED = pa.schema(
    [
        ("query_id", _str),
        ("positive_id", _str),
        ("negative_id", _str),
        ("positive_score", pa.float32()),
        ("negative_score", pa.float32()),
        ("negative_rank", pa.int32()),
        ("source", _str),
        ("bm25_rank", pa.int32()),
        ("dense_rank", pa.int32()),
        ("fused_rank", pa.int32()),
        ("fallback_step", pa.int32()),
    ]
)

# negatives.parquet: one row per (query, positive, negative).
NEGATIVES = pa.schema(
    [
        ("query_id", _str),
        ("positive_id", _str),
        ("negative_id", _str),
        ("query", _str),
        ("positive", _str),
        ("negative", _str),
        *[f for f in SELECTED if f.name not in {"query_id", "positive_id", "negative_id"}],
    ]
)

TRIPLETS = pa.schema([("anchor", _str), ("positive", _str), ("negative", _str)])


def ntuples_schema(num_negatives: int) -> pa.Schema:
    return pa.schema(
        [("anchor", _str), ("positive", _str), *[(f"negative_{i}", _str) for i in range(1, num_negatives + 1)]]
    )


# batched-triplets.parquet / batched-ntuples.parquet: the same columns in training-batch order, and the batch each
# row belongs to (0, 0, ..., 1, 1, ...): every run of `batches.size` rows is one batch.
BATCH = pa.field("batch", pa.int32())
BATCHED_TRIPLETS = pa.schema([*TRIPLETS, BATCH])


def batched_ntuples_schema(num_negatives: int) -> pa.Schema:
    return pa.schema([*ntuples_schema(num_negatives), BATCH])


# labeled-pairs.parquet: one row per distinct (query, positive) with label 1 and (query, negative) with label 0.
# Only these three columns: sentence-transformers' trainers take every column but the label as model input.
LABELED_PAIRS = pa.schema([("query", _str), ("passage", _str), ("label", pa.float32())])

# margin-mse.parquet: the triplets with the teacher's margin, positive_score - negative_score, as the label.
MARGIN_MSE = pa.schema([*TRIPLETS, ("label", pa.float32())])

# flagembedding.jsonl: one line per (query, positive) with the negatives sampled for it and the teacher's scores.
FLAGEMBEDDING = pa.schema(
    [
        ("query", _str),
        ("pos", pa.list_(_str)),
        ("neg", pa.list_(_str)),
        ("pos_scores", pa.list_(pa.float32())),
        ("neg_scores", pa.list_(pa.float32())),
    ]
)

# tevatron.jsonl: one line per (query, positive), passages as {docid, title, text}.
_PASSAGES = pa.list_(pa.struct([("docid", _str), ("title", _str), ("text", _str)]))
TEVATRON = pa.schema(
    [("query_id", _str), ("query", _str), ("positive_passages", _PASSAGES), ("negative_passages", _PASSAGES)]
)


class SchemaError(RuntimeError):
    """A stage produced or was given a table that breaks the contract: a bug, not a user error."""


def conform(table: pa.Table | pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """Select and cast `table` to `schema`, failing if a column is missing."""
    if isinstance(table, pl.DataFrame):
        table = table.to_arrow()
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaError(f"table lacks columns {missing}; has {table.column_names}")
    table = table.select(schema.names)
    # polars writes large_string; the contract uses string so that files written by different
    # stages compare equal.
    return table.cast(schema)
