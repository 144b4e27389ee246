"""Sampling: `num_negatives` per (query, positive) from the candidates the filter kept."""

from __future__ import annotations

import hashlib

import polars as pl
import pyarrow as pa

from miner import schema
from miner.config import SampleConfig
from miner.filter import positive_scores


def _stable_keys(keys: pl.Series) -> pl.Series:
    # polars' own hash differs between releases; a seeded draw must give the same rows on any install.
    return pl.Series(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") >> 1 for k in keys],
        dtype=pl.Int64,
    )


def sample_negatives(
    judged: pa.Table, qrels: pa.Table, teacher_scores: pa.Table, config: SampleConfig
) -> tuple[pa.Table, dict[str, int]]:
    """JUDGED + QRELS -> SELECTED and counts.

    `top` takes the teacher's hardest survivors; `random` draws uniformly from the survivors, `simans`
    with SimANS weights; both draws depend only on (seed, query, positive, candidate), not on row order
    or batch sizes.
    A pair left with fewer survivors keeps what it has and is counted; nothing is padded.
    """
    # Kept candidates, and those the coverage fallback may admit (used only where kept ones run out).
    survivors = pl.from_arrow(judged).filter(pl.col("fallback_step").is_not_null())
    positives = positive_scores(qrels, teacher_scores)
    pairs = positives.join(survivors, on="query_id", how="inner")
    draw = pl.concat_str(
        [pl.lit(str(config.seed)), pl.col("query_id"), pl.col("positive_id"), pl.col("doc_id")], separator="\x1f"
    ).map_batches(_stable_keys, return_dtype=pl.Int64)
    if config.strategy == "top":
        order = pl.col("teacher_rank").cast(pl.Float64)
    elif config.strategy == "random":
        order = draw.cast(pl.Float64)
    else:
        # Weighted draw without replacement (Efraimidis-Spirakis): the smallest -log(u) / weight win.
        gap = pl.col("teacher_score") - pl.col("positive_score") - config.simans_b
        weight = (-config.simans_a * gap * gap).exp()
        uniform = (draw.cast(pl.Float64) + 0.5) / float(2**63)
        order = -uniform.log() / weight
    chosen = (
        pairs.with_columns(_order=order)
        .sort(["query_id", "positive_id", "fallback_step", "_order", "doc_id"])
        .group_by(["query_id", "positive_id"], maintain_order=True)
        .head(config.num_negatives)
        .select(
            "query_id",
            "positive_id",
            negative_id="doc_id",
            positive_score="positive_score",
            negative_score="teacher_score",
            negative_rank="teacher_rank",
            source="source",
            bm25_rank="bm25_rank",
            dense_rank="dense_rank",
            fused_rank="fused_rank",
            fallback_step="fallback_step",
        )
    )
    per_pair = positives.join(
        chosen.group_by(["query_id", "positive_id"]).agg(n=pl.len()), on=["query_id", "positive_id"], how="left"
    ).with_columns(pl.col("n").fill_null(0))
    counts = {
        "pairs": per_pair.height,
        "pairs_full": per_pair.filter(pl.col("n") >= config.num_negatives).height,
        "pairs_short": per_pair.filter((pl.col("n") > 0) & (pl.col("n") < config.num_negatives)).height,
        "pairs_without_negatives": per_pair.filter(pl.col("n") == 0).height,
        "negatives": chosen.height,
        "negatives_from_fallback": chosen.filter(pl.col("fallback_step") > 0).height,
    }
    return schema.conform(chosen, schema.SELECTED), counts
