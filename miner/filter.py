"""False-negative filtering: every candidate gets a verdict, and the verdicts are counted per rule.

Rules, in the order a candidate meets them (the first that applies is recorded in `dropped_by`):
  positive              a labelled positive of the query
  duplicate_of_positive same normalised text as one of the query's positives
  invalid_score         the teacher returned NaN or infinity
  near_duplicate_of_positive
                        cosine with the nearest positive above `max_positive_similarity`
  denoise               teacher score above `denoise_threshold` (RocketQA-style denoising)
  retriever_agreement   BM25 and dense both rank it within `agreement_depth`
  positive_expansion    among the top `expansion_depth` of the query's candidates by evidence of relevance
  rank_window           outside (range_min, range_max] of the teacher's ranking
  topk-abs | topk-marginpos | topk-percpos
                        the positive-aware rule of NV-Retriever (Moreira et al., 2024): a candidate the
                        teacher scores too close to (or above) the positive is likely an unlabelled positive
  min_score             teacher score below `min_score`

With `include_positives` the first two rules are off: positives are ranked (and sampled) like any candidate.
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
    "min_score",
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


# Reciprocal-rank-fusion constant of the evidence (Cormack et al., 2009), as in the candidate pool.
EVIDENCE_RRF_K = 60


def _rank(column: pl.Expr, among: pl.Expr) -> pl.Expr:
    """1-based rank of `column` (highest first) within its query, over the rows `among`; ties share a rank."""
    return pl.when(among).then(column).rank("average", descending=True).over("query_id")


def evidence_of_relevance(config: FilterConfig, among: pl.Expr) -> pl.Expr:
    """How strongly a candidate looks relevant: reciprocal-rank fusion of three signals that err apart, its
    cosine with the query, with the nearest positive and its BM25 score. A candidate all of them rank high is
    the likeliest unlabelled positive; a hard negative is close to the query in the embedding space but shares
    neither the positive's meaning nor the query's words. Fused by rank, so no score scale is assumed."""
    bm25 = pl.col("bm25_score")
    # Past BM25's depth a candidate scores at most the lowest score it returned.
    lexical = bm25.fill_null(pl.when(among).then(bm25).min().over("query_id")).fill_null(0.0)
    signals = (
        (1.0, pl.col("query_cosine")),
        (config.expansion_weight, pl.col("positive_cosine")),
        (config.lexical_weight, lexical),
    )
    return pl.sum_horizontal(
        [weight / (EVIDENCE_RRF_K + _rank(signal, among)) for weight, signal in signals if weight > 0]
    )


def annotated_candidates(
    candidates: pa.Table,
    teacher_scores: pa.Table,
    qrels: pa.Table,
    corpus: pa.Table,
    config: FilterConfig,
    geometry: pa.Table | None,
) -> pl.DataFrame:
    """Every candidate with what the rules read: teacher rank, positive flags and, with geometry, evidence rank."""
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
    invalid = pl.col("teacher_score").is_null() | ~pl.col("teacher_score").is_finite()
    frame = frame.with_columns(
        _is_positive=pl.col("_is_positive").fill_null(False),
        _copies_positive=pl.col("_copies_positive").fill_null(False),
        _invalid=invalid,
    )
    if config.include_positives:
        frame = frame.with_columns(_is_positive=pl.lit(False), _copies_positive=pl.lit(False))
    frame = frame.with_columns(_rankable=~(pl.col("_is_positive") | pl.col("_copies_positive") | pl.col("_invalid")))
    rankable = pl.col("_rankable")
    # Rank by teacher score, ties by doc_id, counting only rankable candidates.
    frame = frame.sort(
        ["query_id", "teacher_score", "doc_id"], descending=[False, True, False], nulls_last=True
    ).with_columns(
        teacher_rank=pl.when(rankable).then(rankable.cast(pl.Int32).cum_sum().over("query_id")),
        _rankable_count=rankable.cast(pl.Int32).sum().over("query_id"),
    )
    if config.needs_geometry:
        if geometry is None:
            raise schema.SchemaError("a positive-geometry rule is set but no geometry table was given")
        frame = frame.join(pl.from_arrow(geometry), on=["query_id", "doc_id"], how="left")
    if config.expansion_depth != 0:
        frame = frame.with_columns(_evidence=evidence_of_relevance(config, rankable))
        frame = frame.sort(["query_id", "_evidence", "doc_id"], descending=[False, True, False]).with_columns(
            _evidence_rank=pl.when(rankable).then(rankable.cast(pl.Int32).cum_sum().over("query_id"))
        )
    return frame


def expansion_cut(depth: int, keep: int) -> pl.Expr:
    """Rows the expansion rule drops at `depth`: never so many that fewer than `keep` candidates remain."""
    cap = pl.max_horizontal(pl.col("_rankable_count") - keep, pl.lit(0))
    return pl.col("_evidence_rank") <= pl.min_horizontal(pl.lit(depth), cap)


def negatives_cosine(frame: pl.DataFrame, config: FilterConfig, depth: int, keep: int) -> float:
    """Mean query cosine of the `keep` best-ranked candidates per query left by the expansion rule at `depth`
    and the rank window: the hardness of the negatives the default sampler would export."""
    window = (pl.col("teacher_rank") > config.range_min) & (pl.col("teacher_rank") <= config.range_max)
    left = frame.filter(pl.col("_rankable") & window & ~expansion_cut(depth, keep))
    chosen = left.sort(["query_id", "teacher_rank"]).group_by("query_id", maintain_order=True).head(keep)
    return float(chosen["query_cosine"].mean() or 0.0)


def auto_expansion_depth(frame: pl.DataFrame, config: FilterConfig, keep: int) -> tuple[int, dict[str, float]]:
    """The deepest expansion cut whose negatives keep `hardness_target` x the reference window's query cosine.

    One depth for the whole run, not one per query: queries whose relevant passages run deep can then lose
    more hardness than those whose do not, which measured better than matching every query on its own.
    """
    window = (pl.col("teacher_rank") > config.reference_min_rank) & (
        pl.col("teacher_rank") <= config.reference_max_rank
    )
    reference = float(frame.filter(pl.col("_rankable") & window)["query_cosine"].mean() or 0.0)
    target = config.hardness_target * reference
    deepest = int(frame["_rankable_count"].max() or 0)
    # Hardness falls as the cut deepens (it removes candidates), so the deepest cut that keeps it is a bisection.
    low, high = 0, deepest
    if negatives_cosine(frame, config, 0, keep) < target:
        high = 0
    while low < high:
        middle = (low + high + 1) // 2
        if negatives_cosine(frame, config, middle, keep) >= target:
            low = middle
        else:
            high = middle - 1
    return low, {
        "expansion_depth": low,
        "hardness_target": config.hardness_target,
        "reference_cosine": round(reference, 4),
        "negatives_cosine": round(negatives_cosine(frame, config, low, keep), 4),
    }


def positive_aware_filter(
    candidates: pa.Table,
    teacher_scores: pa.Table,
    qrels: pa.Table,
    corpus: pa.Table,
    config: FilterConfig,
    geometry: pa.Table | None = None,
    keep: int = 1,
) -> pa.Table:
    """CANDIDATES + TEACHER_SCORES + QRELS + CORPUS -> JUDGED (every candidate, with its verdict).

    `geometry` (score.positive_geometry) is needed when `config.needs_geometry`. `keep`: candidates the
    expansion rule leaves each query at least (the sampler's quota). An "auto" depth is resolved here.
    """
    frame = annotated_candidates(candidates, teacher_scores, qrels, corpus, config, geometry)
    return judge(frame, config, keep)


def judge(frame: pl.DataFrame, config: FilterConfig, keep: int = 1) -> pa.Table:
    """annotated_candidates' frame -> JUDGED. Settings that only move the expansion cut (its depth, the hardness
    target) can be judged again on one annotated frame."""
    depth = config.expansion_depth
    if depth == "auto":
        depth, _ = auto_expansion_depth(frame, config, keep)
    verdict = (
        pl.when(pl.col("_is_positive"))
        .then(pl.lit("positive"))
        .when(pl.col("_copies_positive"))
        .then(pl.lit("duplicate_of_positive"))
        .when(pl.col("_invalid"))
        .then(pl.lit("invalid_score"))
    )
    if config.max_positive_similarity is not None:
        verdict = verdict.when(pl.col("positive_cosine") > config.max_positive_similarity).then(
            pl.lit("near_duplicate_of_positive")
        )
    if config.denoise_threshold is not None:
        verdict = verdict.when(pl.col("teacher_score") > config.denoise_threshold).then(pl.lit("denoise"))
    if config.agreement_depth > 0:
        both_high = (pl.col("bm25_rank") <= config.agreement_depth) & (pl.col("dense_rank") <= config.agreement_depth)
        verdict = verdict.when(both_high.fill_null(False)).then(pl.lit("retriever_agreement"))
    if depth > 0:
        verdict = verdict.when(expansion_cut(depth, keep)).then(pl.lit("positive_expansion"))
    verdict = verdict.when(
        (pl.col("teacher_rank") <= config.range_min) | (pl.col("teacher_rank") > config.range_max)
    ).then(pl.lit("rank_window"))
    ceiling = score_ceiling(config)
    if ceiling is not None:
        verdict = verdict.when(pl.col("teacher_score") > ceiling).then(pl.lit(config.method))
    if config.min_score is not None:
        verdict = verdict.when(pl.col("teacher_score") < config.min_score).then(pl.lit("min_score"))
    frame = frame.with_columns(dropped_by=verdict.otherwise(pl.lit(None, pl.String)))
    # Past range_max and clear of every other rule: admissible if the pair is short of negatives.
    beyond = pl.col("teacher_rank") - config.range_max
    passes_score_rule = pl.lit(True) if ceiling is None else pl.col("teacher_score") <= ceiling
    if config.min_score is not None:
        passes_score_rule = passes_score_rule & (pl.col("teacher_score") >= config.min_score)
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
