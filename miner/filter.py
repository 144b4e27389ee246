"""False-negative filtering: every candidate gets a verdict, and the verdicts are counted per rule.

Rules, in the order a candidate meets them (the first that applies is recorded in `dropped_by`):
  positive              a labelled positive of the query
  duplicate_of_positive same normalised text as one of the query's positives
  invalid_score         the teacher returned NaN or infinity
  near_duplicate_of_positive
                        cosine with the nearest positive above `max_positive_similarity`
  denoise               teacher score above `denoise_threshold` (RocketQA-style denoising)
  retriever_agreement   BM25 and dense both rank it within `agreement_depth`
  positive_expansion    among the top `expansion_depth` for the query expanded by its positives
  rank_window           outside (range_min, range_max] of the teacher's ranking
  topk-abs | topk-marginpos | topk-percpos
                        the positive-aware rule of NV-Retriever (Moreira et al., 2024): a candidate the
                        teacher scores too close to (or above) the positive is likely an unlabelled positive
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from miner import schema
from miner.config import FilterConfig
from miner.tables import rows_named

RULES = (
    "positive",
    "duplicate_of_positive",
    "invalid_score",
    "near_duplicate_of_positive",
    "denoise",
    "retriever_agreement",
    "positive_expansion",
    "rank_window",
    "topk-abs",
    "topk-marginpos",
    "topk-percpos",
)


def positive_scores(qrels: pa.Table, teacher_scores: pa.Table) -> pl.DataFrame:
    """(query_id, positive_id, positive_score) for every labelled positive."""
    return (
        pl.from_arrow(qrels.select(["query_id", "doc_id"]))
        .join(pl.from_arrow(teacher_scores), on=["query_id", "doc_id"], how="left")
        .select("query_id", positive_id="doc_id", positive_score="teacher_score")
    )


def positive_reference(positives: pl.DataFrame, how: str) -> pl.DataFrame:
    """One reference score per query from its positives' scores: min (the strictest), mean or max."""
    score = pl.col("positive_score")
    aggregate = {"min": score.min(), "mean": score.mean(), "max": score.max()}[how]
    return positives.group_by("query_id").agg(positive_reference=aggregate.cast(pl.Float32))


def score_ceiling(config: FilterConfig) -> pl.Expr | None:
    """The teacher score above which the configured rule drops a candidate (None: no score rule)."""
    reference = pl.col("positive_reference")
    if config.method == "topk-abs":
        return pl.lit(config.max_score)
    if config.method == "topk-marginpos":
        return reference - config.margin
    if config.method == "topk-percpos":
        # pct x positive, written so that it stays below the positive when the score is negative
        # (logits): for a positive score this equals pct * reference.
        return reference - (1.0 - config.pct) * reference.abs()
    return None


def positive_aware_filter(
    candidates: pa.Table,
    teacher_scores: pa.Table,
    qrels: pa.Table,
    corpus: pa.Table,
    config: FilterConfig,
    geometry: pa.Table | None = None,
) -> pa.Table:
    """CANDIDATES + TEACHER_SCORES + QRELS + CORPUS -> JUDGED (every candidate, with its verdict).

    `geometry` (score.positive_geometry) is needed when `config.needs_geometry`.
    """
    positives = positive_scores(qrels, teacher_scores)
    named = rows_named(corpus, "doc_id", candidates["doc_id"], qrels["doc_id"])
    hashes = pl.from_arrow(named.select(["doc_id", "text_hash"]))
    positive_hashes = (
        pl.from_arrow(qrels.select(["query_id", "doc_id"]))
        .join(hashes, on="doc_id")
        .select("query_id", "text_hash")
        .unique()
        .with_columns(_copies_positive=pl.lit(True))
    )
    frame = (
        pl.from_arrow(candidates)
        .join(pl.from_arrow(teacher_scores), on=["query_id", "doc_id"], how="left")
        .join(
            positives.select("query_id", "positive_id", _is_positive=pl.lit(True)),
            left_on=["query_id", "doc_id"],
            right_on=["query_id", "positive_id"],
            how="left",
        )
        .join(hashes, on="doc_id", how="left")
        .join(positive_hashes, on=["query_id", "text_hash"], how="left")
        .join(positive_reference(positives, config.positive_reference), on="query_id", how="left")
    )
    is_positive = pl.col("_is_positive").fill_null(False)
    copies_positive = pl.col("_copies_positive").fill_null(False)
    invalid = pl.col("teacher_score").is_null() | ~pl.col("teacher_score").is_finite()
    rankable = ~(is_positive | copies_positive | invalid)
    # Rank by teacher score, ties by doc_id, counting only rankable candidates.
    frame = frame.sort(
        ["query_id", "teacher_score", "doc_id"], descending=[False, True, False], nulls_last=True
    ).with_columns(teacher_rank=pl.when(rankable).then(rankable.cast(pl.Int32).cum_sum().over("query_id")))
    verdict = (
        pl.when(is_positive)
        .then(pl.lit("positive"))
        .when(copies_positive)
        .then(pl.lit("duplicate_of_positive"))
        .when(invalid)
        .then(pl.lit("invalid_score"))
    )
    if config.needs_geometry:
        if geometry is None:
            raise schema.SchemaError("a positive-geometry rule is set but no geometry table was given")
        frame = frame.join(pl.from_arrow(geometry), on=["query_id", "doc_id"], how="left")
    if config.max_positive_similarity is not None:
        verdict = verdict.when(pl.col("positive_cosine") > config.max_positive_similarity).then(
            pl.lit("near_duplicate_of_positive")
        )
    if config.denoise_threshold is not None:
        verdict = verdict.when(pl.col("teacher_score") > config.denoise_threshold).then(pl.lit("denoise"))
    if config.agreement_depth > 0:
        both_high = (pl.col("bm25_rank") <= config.agreement_depth) & (pl.col("dense_rank") <= config.agreement_depth)
        verdict = verdict.when(both_high.fill_null(False)).then(pl.lit("retriever_agreement"))
    if config.expansion_depth > 0:
        frame = frame.sort(["query_id", "expanded_score", "doc_id"], descending=[False, True, False]).with_columns(
            _expanded_rank=pl.when(rankable).then(rankable.cast(pl.Int32).cum_sum().over("query_id"))
        )
        depth = pl.min_horizontal(pl.lit(config.expansion_depth), rankable.cast(pl.Int32).sum().over("query_id") // 2)
        verdict = verdict.when(pl.col("_expanded_rank") <= depth).then(pl.lit("positive_expansion"))
    verdict = verdict.when(
        (pl.col("teacher_rank") <= config.range_min) | (pl.col("teacher_rank") > config.range_max)
    ).then(pl.lit("rank_window"))
    ceiling = score_ceiling(config)
    if ceiling is not None:
        verdict = verdict.when(pl.col("teacher_score") > ceiling).then(pl.lit(config.method))
    frame = frame.with_columns(dropped_by=verdict.otherwise(pl.lit(None, pl.String)))
    # Past range_max and clear of every other rule: admissible if the pair is short of negatives.
    beyond = pl.col("teacher_rank") - config.range_max
    passes_score_rule = pl.lit(True) if ceiling is None else pl.col("teacher_score") <= ceiling
    step = ((beyond + config.fallback_width - 1) // config.fallback_width).cast(pl.Int32)
    frame = frame.with_columns(
        fallback_step=pl.when(pl.col("dropped_by").is_null())
        .then(pl.lit(0, pl.Int32))
        .when(
            (pl.col("dropped_by") == "rank_window") & (beyond > 0) & passes_score_rule & (step <= config.fallback_steps)
        )
        .then(step)
    )
    return schema.conform(frame.sort("query_id", "fused_rank"), schema.JUDGED)


def filter_counts(judged: pa.Table) -> dict[str, int]:
    """How many candidates each rule removed, and how many survived."""
    counted = pl.from_arrow(judged.select(["dropped_by"]))["dropped_by"].fill_null("kept").value_counts()
    found = dict(zip(counted["dropped_by"].to_list(), counted["count"].to_list(), strict=True))
    return {rule: int(found.get(rule, 0)) for rule in (*RULES, "kept")}
