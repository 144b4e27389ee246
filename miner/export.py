"""Export: selected ids -> training tables with texts, written atomically, plus the manifest."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from miner import schema
from miner.tables import rows_named

NEGATIVES_FILE = "negatives.parquet"
TRIPLETS_FILE = "triplets.parquet"
NTUPLES_FILE = "ntuples.parquet"
MANIFEST_FILE = "manifest.json"
# `miner report`'s default folder inside OUT: drawn from one run's manifest, so removed when the run is replaced.
REPORT_DIR = "report"


def rejected_folder(out: Path, run_id: str) -> Path:
    """Where a run that missed a quality gate writes instead of OUT: beside it, so OUT (the last good run, which
    trainers read) is never touched, and a folder per run, so a rejected run never overwrites another."""
    return out.parent / f"{out.name}.rejected" / run_id


def run_report_folder(out: Path, run_id: str) -> Path:
    """Where a flow run writes its report: beside OUT, so OUT holds exactly the files its manifest lists, and a
    folder per run, so the link each run published in the Prefect UI keeps showing that run."""
    return out.parent / f"{out.name}.reports" / run_id


def training_rows(selected: pa.Table, queries: pa.Table, corpus: pa.Table) -> pa.Table:
    """SELECTED -> NEGATIVES: the ids joined to their texts, in the sampler's order."""
    named = rows_named(corpus, "doc_id", selected["positive_id"], selected["negative_id"])
    texts = pl.from_arrow(named.select(["doc_id", "text"]))
    frame = (
        pl.from_arrow(selected)
        .join(
            pl.from_arrow(queries.select(["query_id", "text"])).rename({"text": "query"}),
            on="query_id",
            how="left",
            maintain_order="left",
        )
        .join(
            texts.rename({"doc_id": "positive_id", "text": "positive"}),
            on="positive_id",
            how="left",
            maintain_order="left",
        )
        .join(
            texts.rename({"doc_id": "negative_id", "text": "negative"}),
            on="negative_id",
            how="left",
            maintain_order="left",
        )
    )
    return schema.conform(frame, schema.NEGATIVES)


def triplets(negatives: pa.Table) -> pa.Table:
    """(anchor, positive, negative): what MultipleNegativesRankingLoss and TripletLoss read."""
    frame = pl.from_arrow(negatives.select(["query", "positive", "negative"]))
    return schema.conform(frame.rename({"query": "anchor"}), schema.TRIPLETS)


def complete_pairs(negatives: pa.Table, num_negatives: int) -> tuple[pl.DataFrame, int]:
    """(one row per (query, positive) with all n negatives: ids, texts, `negative_ids` and `negatives` lists cut
    to n, in the sampler's order; how many pairs had fewer)."""
    frame = pl.from_arrow(negatives.select(["query_id", "positive_id", "negative_id", "query", "positive", "negative"]))
    grouped = frame.group_by(["query_id", "positive_id"], maintain_order=True).agg(
        anchor=pl.col("query").first(),
        positive=pl.col("positive").first(),
        negative_ids=pl.col("negative_id").head(num_negatives),
        negatives=pl.col("negative").head(num_negatives),
        count=pl.len(),
    )
    complete = grouped.filter(pl.col("count") >= num_negatives).drop("count")
    return complete, grouped.height - complete.height


def ntuples(negatives: pa.Table, num_negatives: int) -> tuple[pa.Table, int]:
    """(anchor, positive, negative_1..n), one row per (query, positive) that got all n negatives.

    Trainers need every row to have the same columns, so pairs with fewer negatives are left out of
    this shape (they stay in negatives.parquet and triplets.parquet) and counted.
    """
    complete, incomplete = complete_pairs(negatives, num_negatives)
    return wide_ntuples(complete, num_negatives), incomplete


def wide_ntuples(complete: pl.DataFrame, num_negatives: int) -> pa.Table:
    wide = complete.select(
        "anchor",
        "positive",
        *[pl.col("negatives").list.get(i).alias(f"negative_{i + 1}") for i in range(num_negatives)],
    )
    return schema.conform(wide, schema.ntuples_schema(num_negatives))


def score_statistics(negatives: pa.Table) -> dict[str, dict[str, float]]:
    """Distribution of teacher scores of the exported positives and negatives, and of their margin."""
    frame = pl.from_arrow(negatives.select(["query_id", "positive_id", "positive_score", "negative_score"]))
    series = {
        "positive_score": frame.unique(["query_id", "positive_id"])["positive_score"],
        "negative_score": frame["negative_score"],
        "margin": frame["positive_score"] - frame["negative_score"],
    }
    return {name: describe(values) for name, values in series.items()}


def describe(values: pl.Series) -> dict[str, float]:
    if values.len() == 0:
        return {"count": 0}
    stats = {"count": values.len(), "mean": values.mean(), "std": values.std(), "min": values.min()}
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        stats[f"p{int(q * 100)}"] = values.quantile(q, interpolation="linear")
    stats["max"] = values.max()
    return {k: (round(float(v), 6) if isinstance(v, float) else v) for k, v in stats.items() if v is not None}
