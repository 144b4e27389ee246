"""Training files for other trainers, each cut from the NEGATIVES table; `formats` in the config picks them.

| format | file | rows | read by |
|---|---|---|---|
| negatives | negatives.parquet | (query, positive, negative) with ids and teacher scores | people, `miner report` |
| triplets | triplets.parquet | (anchor, positive, negative) | sentence-transformers MultipleNegativesRankingLoss |
| ntuples | ntuples.parquet | (anchor, positive, negative_1..n) | sentence-transformers MultipleNegativesRankingLoss |
| labeled-pairs | labeled-pairs.parquet | (query, passage, label 1/0) | sentence-transformers CrossEncoder, BCE loss |
| margin-mse | margin-mse.parquet | (anchor, positive, negative, teacher margin) | sentence-transformers MarginMSELoss |
| flagembedding | flagembedding.jsonl | {query, pos, neg, pos_scores, neg_scores} | FlagEmbedding fine-tuning |
| tevatron | tevatron.jsonl | {query_id, query, positive_passages, negative_passages} | Tevatron training |
| batched-triplets | batched-triplets.parquet | triplets in training-batch order, with `batch` | MNRL, in file order |
| batched-ntuples | batched-ntuples.parquet | ntuples in training-batch order, with `batch` | MNRL, in file order |

The JSONL formats hold one line per (query, positive), not per query: each positive keeps the negatives that
were sampled for it and the teacher scores they were sampled by, and both trainers draw one positive per line
and epoch, so a line per query would show a query's other positives only in other epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa

from miner import export, schema
from miner.atomic import atomic_write, write_parquet_atomic
from miner.batches import BatchContext, batch_counts, order_batches, training_rows

LABELED_PAIRS_FILE = "labeled-pairs.parquet"
MARGIN_MSE_FILE = "margin-mse.parquet"
FLAGEMBEDDING_FILE = "flagembedding.jsonl"
TEVATRON_FILE = "tevatron.jsonl"
BATCHED_TRIPLETS_FILE = "batched-triplets.parquet"
BATCHED_NTUPLES_FILE = "batched-ntuples.parquet"

# Format name (config `formats`, CLI `--format`) -> file name, in the order files are written.
FILES: dict[str, str] = {
    "negatives": export.NEGATIVES_FILE,
    "triplets": export.TRIPLETS_FILE,
    "ntuples": export.NTUPLES_FILE,
    "labeled-pairs": LABELED_PAIRS_FILE,
    "flagembedding": FLAGEMBEDDING_FILE,
    "tevatron": TEVATRON_FILE,
    "margin-mse": MARGIN_MSE_FILE,
    "batched-triplets": BATCHED_TRIPLETS_FILE,
    "batched-ntuples": BATCHED_NTUPLES_FILE,
}

# `datasets.load_dataset(OUT, name)` uses one builder for a whole folder (the one its first config's files
# need), so a JSONL format also gets a Parquet copy of the same rows under the same config name. The JSONL file
# stays the one its trainer reads; the copy is small beside it (Parquet compresses the repeated passages).
DATASET_TWINS: dict[str, str] = {
    FLAGEMBEDDING_FILE: "flagembedding.parquet",
    TEVATRON_FILE: "tevatron.parquet",
}

_PAIR = ["query_id", "positive_id"]


def labeled_pairs(negatives: pa.Table) -> pa.Table:
    """(query, passage, label): 1.0 once per distinct (query, positive), 0.0 once per distinct (query, negative).

    A negative sampled for several positives of one query appears once. Each query's rows stay together,
    positives first, in the sampler's order.
    """
    frame = pl.from_arrow(negatives.select(["query_id", "positive_id", "negative_id", "query", "positive", "negative"]))
    positives = frame.select("query_id", "query", doc_id="positive_id", passage="positive", label=pl.lit(1.0))
    negatives_only = frame.select("query_id", "query", doc_id="negative_id", passage="negative", label=pl.lit(0.0))
    query_order = frame.select("query_id").unique(maintain_order=True).with_row_index("query_order")
    rows = (
        pl.concat([positives, negatives_only])
        .unique(["query_id", "doc_id"], keep="first", maintain_order=True)
        .join(query_order, on="query_id", maintain_order="left")
        .sort("query_order", maintain_order=True)
    )
    return schema.conform(rows, schema.LABELED_PAIRS)


def margin_mse(negatives: pa.Table) -> pa.Table:
    """(anchor, positive, negative, label = positive_score - negative_score), on the teacher's score scale."""
    frame = pl.from_arrow(negatives.select(["query", "positive", "negative", "positive_score", "negative_score"]))
    rows = frame.select(
        anchor="query",
        positive="positive",
        negative="negative",
        label=pl.col("positive_score") - pl.col("negative_score"),
    )
    return schema.conform(rows, schema.MARGIN_MSE)


def _per_pair(negatives: pa.Table, **aggregations: pl.Expr) -> pl.DataFrame:
    """One row per (query, positive), in the sampler's order, with `aggregations` over its negatives."""
    return pl.from_arrow(negatives).group_by(_PAIR, maintain_order=True).agg(**aggregations)


def flagembedding(negatives: pa.Table) -> pa.Table:
    """FlagEmbedding's fine-tuning lines: {query, pos, neg, pos_scores, neg_scores}.

    No `prompt` key: FlagEmbedding uses a line's `prompt` in place of its own query instruction whenever the
    key is present, so an empty one would erase the instruction a user configures there.
    """
    rows = _per_pair(
        negatives,
        query=pl.col("query").first(),
        pos=pl.concat_list(pl.col("positive").first()),
        neg=pl.col("negative"),
        pos_scores=pl.concat_list(pl.col("positive_score").first()),
        neg_scores=pl.col("negative_score"),
    )
    return schema.conform(rows, schema.FLAGEMBEDDING)


def _passage(id_column: str, text_column: str) -> pl.Expr:
    # Ingest folds a document's title into its text (docs/input-output.md, Input), so the title field is empty: Tevatron
    # joins title and text with a space, and the model sees the same passage the miner scored.
    return pl.struct(docid=pl.col(id_column), title=pl.lit(""), text=pl.col(text_column))


def tevatron(negatives: pa.Table) -> pa.Table:
    """Tevatron's training lines: {query_id, query, positive_passages, negative_passages}, passages as
    {docid, title, text}."""
    rows = _per_pair(
        negatives,
        query=pl.col("query").first(),
        positive_passages=pl.concat_list(_passage("positive_id", "positive").first()),
        negative_passages=_passage("negative_id", "negative"),
    )
    return schema.conform(rows, schema.TEVATRON)


_BUILDERS: dict[str, Callable[[pa.Table], pa.Table]] = {
    "negatives": lambda negatives: negatives,
    "triplets": export.triplets,
    "labeled-pairs": labeled_pairs,
    "flagembedding": flagembedding,
    "tevatron": tevatron,
    "margin-mse": margin_mse,
}


def build_exports(
    negatives: pa.Table, formats: Sequence[str], num_negatives: int, batching: BatchContext | None = None
) -> tuple[dict[str, pa.Table], dict[str, int], dict[str, int | float]]:
    """NEGATIVES -> (file name -> table for each chosen format, rows per file, what the batched files hold).

    `batching` is needed (and only used) by the batched formats.
    """
    tables: dict[str, pa.Table] = {}
    counts: dict[str, int] = {}
    batch_stats: dict[str, int | float] = {}
    for name, file_name in FILES.items():
        if name not in formats:
            continue
        if name in ("ntuples", "batched-ntuples"):
            # Its width is num_negatives, and the pairs it leaves out are worth counting.
            complete, incomplete = export.complete_pairs(negatives, num_negatives)
            tables[file_name] = export.wide_ntuples(complete, num_negatives)
            counts["ntuples_incomplete_pairs_left_out"] = incomplete
            keys = complete.select("query_id", "positive_id", "negative_ids")
        else:
            tables[file_name] = _BUILDERS[name.removeprefix("batched-")](negatives)
            keys = pl.from_arrow(negatives.select(["query_id", "positive_id", "negative_id"])).select(
                "query_id", "positive_id", negative_ids=pl.concat_list("negative_id")
            )
        if name.startswith("batched-"):
            assert batching is not None, "a batched format needs the batching context"
            tables[file_name], stats = in_batches(tables[file_name], keys, batching)
            batch_stats.update({f"{name}.{key}": value for key, value in stats.items()})
        counts[file_name] = tables[file_name].num_rows
        if file_name in DATASET_TWINS:
            tables[DATASET_TWINS[file_name]] = tables[file_name]
    return tables, counts, batch_stats


def in_batches(table: pa.Table, keys: pl.DataFrame, batching: BatchContext) -> tuple[pa.Table, dict[str, int | float]]:
    """`table`'s rows (described by `keys`) in conflict-free training batches, with their `batch` column."""
    rows = training_rows(keys, batching)
    ordered = order_batches(rows, batching.size, batching.seed)
    batched = table.take(pa.array(ordered.rows)).append_column(schema.BATCH, pa.array(ordered.batch, pa.int32()))
    return batched, batch_counts(rows, ordered, batching.size, batching.seed)


def write_jsonl_atomic(table: pa.Table, path: Path, scratch: Path | None = None) -> None:
    with atomic_write(path, scratch) as temporary:
        pl.from_arrow(table).write_ndjson(temporary)


def write_exports(tables: dict[str, pa.Table], out: Path, scratch: Path | None = None) -> None:
    for name, table in tables.items():
        if name.endswith(".jsonl"):
            write_jsonl_atomic(table, out / name, scratch)
        else:
            write_parquet_atomic(table, out / name, scratch)


def remove_unchosen(out: Path, formats: Sequence[str]) -> None:
    """Delete the files of formats this run does not write, so that no earlier run's file sits in `out`
    unlisted by the manifest, where a trainer could pick it up as this run's."""
    for name, file_name in FILES.items():
        if name not in formats:
            (out / file_name).unlink(missing_ok=True)
            if file_name in DATASET_TWINS:
                (out / DATASET_TWINS[file_name]).unlink(missing_ok=True)
