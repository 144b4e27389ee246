"""Batch-aware export: rows ordered so that each run of `size` consecutive rows is one training batch.

With in-batch-negative losses (MultipleNegativesRankingLoss and its cached variants), every other row's
positive and negatives in a batch are negatives for a row's query. Two things then matter, and a shuffling
trainer leaves both to chance:

- no in-batch false negatives: no row may bring into a batch a passage that answers another row's query
  there: one of that query's labelled positives, a copy of one (same text), or a near-copy (cosine with one of
  them at least `near_copy`, in the embedding model's space). Rows of one query never share a batch either.
- hard in-batch negatives: as in TAS-Balanced (Hofstätter et al., 2021), each batch is one topic cluster of
  queries, on the run's own embeddings. Here the cluster forms around the batch's first query rather than being
  a fixed k-means cluster: each next query is the one nearest the batch so far (its positives to the batch's
  queries and its query to the batch's positives), among those that bring no conflict.

How a batch is built: its first query is the one with the most rows left; how due each other query is (its rows
left per batch left) weighs against its nearness, so that queries with many rows are not left over at the end,
where they could only meet each other. Of a chosen query's rows, the conflict-free one whose positive is nearest
the batch's queries joins. When the cluster around the first query cannot fill the batch, any queries will do
(most rows left first); when even that fails, another query starts the batch. What no full batch can take is
unplaced: counted, never dropped silently and never put into a conflicting batch. The order of the batches is
shuffled; all of it is seeded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from miner.errors import InputError
from miner.vectors import gathered

# Weight of how due a query is (its rows left per batch left, 1 = in every batch left) against its mean nearness to
# the batch (a sum of two cosines). Chosen on Cranfield's and CISI's triplets at batch size 32: with 0 instead,
# Cranfield left 1,367 of 8,055 rows unplaced instead of 247, for 0.013 more hardness; CISI placed 608 rows
# instead of 672.
BALANCE = 1.0


@dataclass(frozen=True)
class TrainingRows:
    """What batching needs to know of each row of a training file, and of the passages they name.

    `docs[i]` are the passage numbers row i puts in front of the model (its positive, then its negatives);
    `positive[i]` its positive's number; `query[i]` its query's number. `forbidden[q]` is the set of passage
    numbers that answer query q (labelled positives, their copies and near-copies). Vectors are unit length.
    """

    query: np.ndarray  # (rows,) query number
    positive: np.ndarray  # (rows,) passage number
    docs: list[frozenset[int]]
    forbidden: list[frozenset[int]]
    query_vectors: np.ndarray  # (queries, dim)
    doc_vectors: np.ndarray  # (passages, dim)


@dataclass(frozen=True)
class BatchOrder:
    rows: np.ndarray  # row numbers in file order
    batch: np.ndarray  # the batch number of each, 0, 0, ..., 1, 1, ...
    unplaced: int


def conflicts(rows: TrainingRows, a: int, b: int) -> bool:
    """Whether rows a and b may not share a batch: one query, or one brings a passage answering the other's."""
    qa, qb = rows.query[a], rows.query[b]
    return (
        qa == qb or not rows.docs[b].isdisjoint(rows.forbidden[qa]) or not rows.docs[a].isdisjoint(rows.forbidden[qb])
    )


def mean_positives(rows: TrainingRows) -> np.ndarray:
    """Per query, the mean vector of the positives of its rows: where its passages lie."""
    sums = np.zeros_like(rows.query_vectors)
    np.add.at(sums, rows.query, rows.doc_vectors[rows.positive])
    counts = np.bincount(rows.query, minlength=len(sums)).astype(np.float32)[:, None]
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)


def order_batches(rows: TrainingRows, size: int, seed: int) -> BatchOrder:
    """Rows grouped into conflict-free batches of exactly `size`, each one topic cluster of queries."""
    rng = np.random.default_rng(seed)
    queries = len(rows.query_vectors)
    positives = mean_positives(rows)
    # Among equals, a seeded order rather than the input's: candidates are listed in it, and argmax takes the first.
    tie_break = rng.permutation(queries)
    left: list[deque[int]] = [deque() for _ in range(queries)]
    for row in rng.permutation(len(rows.query)):
        left[rows.query[row]].append(int(row))
    remaining = np.array([len(rows_of) for rows_of in left])
    batches: list[list[int]] = []
    # Queries that could not start a batch since the last batch was made: another first query is tried.
    blocked = np.zeros(queries, dtype=bool)
    while np.count_nonzero(remaining) >= size and np.count_nonzero(remaining[~blocked]):
        active = np.flatnonzero(remaining)
        active = active[np.argsort(tie_break[active])]
        starters = active[~blocked[active]]
        first = starters[np.argmax(remaining[starters])]
        candidates = active[active != first]
        # How due each query is: its rows left per batch left (1: it must be in every batch left).
        due = remaining[candidates] / max(remaining.sum() // size, 1)
        nearness = _affinity(rows.query_vectors, positives, candidates)
        batch = _fill(rows, left, candidates, left[first][0], size, nearness, BALANCE * due)
        if batch is None:
            # The topic cluster around `first` has too few queries it may meet: any queries will do, the ones
            # with most rows first.
            batch = _fill(rows, left, candidates, left[first][0], size, None, remaining[candidates].astype(float))
        if batch is None:
            blocked[first] = True
            continue
        for row in batch:
            left[rows.query[row]].remove(row)
            remaining[rows.query[row]] -= 1
        batches.append(batch)
        blocked[:] = False
    unplaced = int(remaining.sum())
    shuffled = [batches[i] for i in rng.permutation(len(batches))]
    order_rows = np.array([row for batch in shuffled for row in batch], dtype=np.int64)
    numbers = np.repeat(np.arange(len(shuffled), dtype=np.int32), size)
    return BatchOrder(order_rows, numbers, unplaced)


def _affinity(query_vectors: np.ndarray, positives: np.ndarray, candidates: np.ndarray) -> Callable[[int], np.ndarray]:
    """For a query m, how hard each candidate and m are as each other's in-batch negatives: the cosine of each
    query with the other's positives, both ways."""

    def of(member: int) -> np.ndarray:
        return query_vectors[candidates] @ positives[member] + positives[candidates] @ query_vectors[member]

    return of


def _fill(
    rows: TrainingRows,
    left: list[deque[int]],
    candidates: np.ndarray,
    first: int,
    size: int,
    nearness: Callable[[int], np.ndarray] | None,
    priority: np.ndarray,
) -> list[int] | None:
    """A batch of `size` rows starting with row `first`; None when the candidate queries run out first.

    Each next query is the candidate with the highest `priority` plus mean `nearness` to the batch's queries
    (without `nearness`, `priority` alone). A candidate that would meet a passage answering it is skipped; of
    the rest, the row that brings no passage answering a query of the batch and whose positive is nearest the
    batch's queries joins.
    """
    batch = [first]
    docs = set(rows.docs[first])
    forbidden = set(rows.forbidden[rows.query[first]])
    near = np.zeros(len(candidates)) if nearness is None else nearness(rows.query[first])
    open_ = np.ones(len(candidates), dtype=bool)
    while len(batch) < size and open_.any():
        score = priority + near / len(batch)
        pick = int(np.argmax(np.where(open_, score, -np.inf)))
        open_[pick] = False
        query = candidates[pick]
        if not rows.forbidden[query].isdisjoint(docs):
            continue  # every row of this query would meet a passage answering it
        fitting = [r for r in left[query] if rows.docs[r].isdisjoint(forbidden)]
        if not fitting:
            continue
        # Of its rows, the one whose positive is nearest the batch's queries: the hardest negative it can be.
        members = rows.query_vectors[rows.query[batch]].sum(axis=0)
        row = fitting[int(np.argmax(rows.doc_vectors[rows.positive[fitting]] @ members))]
        batch.append(row)
        docs |= rows.docs[row]
        forbidden |= rows.forbidden[query]
        if nearness is not None:
            near += nearness(query)
    return batch if len(batch) == size else None


def batch_hardness(rows: TrainingRows, order: np.ndarray, size: int) -> float:
    """Mean cosine of each row's query with the other rows' positives in its batch (full batches of `order`)."""
    full = len(order) // size
    if full == 0:
        return float("nan")
    grouped = order[: full * size].reshape(full, size)
    q = rows.query_vectors[rows.query[grouped]]  # (batches, size, dim)
    p = rows.doc_vectors[rows.positive[grouped]]
    similarity = np.einsum("bid,bjd->bij", q, p)
    off_diagonal = similarity.sum(axis=(1, 2)) - np.trace(similarity, axis1=1, axis2=2)
    return float(off_diagonal.sum() / (full * size * (size - 1)))


def batch_conflicts(rows: TrainingRows, order: np.ndarray, size: int) -> int:
    """Pairs of rows sharing a batch of `order` that may not (see `conflicts`)."""
    found = 0
    for start in range(0, len(order) - size + 1, size):
        members = order[start : start + size]
        found += sum(bool(conflicts(rows, a, b)) for i, a in enumerate(members) for b in members[i + 1 :])
    return found


def batch_counts(rows: TrainingRows, ordered: BatchOrder, size: int, seed: int) -> dict[str, int | float]:
    """What the manifest says of a batched file, against the same rows in a seeded random order."""
    shuffled = np.random.default_rng(seed).permutation(len(rows.query))
    return {
        "batch_size": size,
        "batches": int(len(ordered.rows) // size),
        "rows_placed": len(ordered.rows),
        "rows_unplaced": ordered.unplaced,
        "conflicts": batch_conflicts(rows, ordered.rows, size),
        "conflicts_avoided": batch_conflicts(rows, shuffled, size),
        "hardness": round(batch_hardness(rows, ordered.rows, size), 4),
        "hardness_random_order": round(batch_hardness(rows, shuffled, size), 4),
    }


def check_batch_size(size: int | None, queries: int, what: str) -> None:
    """Refuse a batch larger than the distinct queries there are: rows of one query never share a batch."""
    if size is not None and size > queries:
        raise InputError(
            "--batch-size",
            f"a batch of {size} rows needs {size} distinct queries (rows of one query never share a batch), and "
            f"{what} has {queries}",
            f"give --batch-size {queries} or less",
        )


def ids_to_numbers(values: pl.Series, numbering: dict[str, int]) -> np.ndarray:
    return np.array([numbering[value] for value in values.to_list()], dtype=np.int64)


@dataclass(frozen=True)
class BatchContext:
    """Everything a batched file needs besides its rows: the settings, the labelled positives and texts'
    hashes, and the run's embeddings (ids and unit vectors)."""

    size: int
    seed: int
    near_copy: float
    # Whether other rows' negatives count too (MultipleNegativesRankingLoss scores every passage in the batch);
    # without, only their positives are kept from answering a query of the batch.
    check_negatives: bool
    qrels: pl.DataFrame  # query_id, doc_id: labelled positives
    text_hashes: pl.DataFrame  # doc_id, text_hash of every passage the rows or qrels name
    query_ids: list[str]
    query_vectors: np.ndarray
    doc_ids: list[str]
    doc_vectors: np.ndarray


def _vectors(ids: list[str], known_ids: list[str], known: np.ndarray) -> np.ndarray:
    """Rows of `known` for `ids`; zeros for an id without a vector (it then counts as like nothing)."""
    position = {value: row for row, value in enumerate(known_ids)}
    rows = np.array([position.get(value, -1) for value in ids], dtype=np.int64)
    out = np.zeros((len(ids), known.shape[1]), dtype=np.float32)
    found = rows >= 0
    if found.any():
        out[found] = gathered(known, rows[found])
    return out


def training_rows(keys: pl.DataFrame, context: BatchContext) -> TrainingRows:
    """`keys` (query_id, positive_id, negative_ids: list) of each row of a training file -> TrainingRows."""
    query_ids = keys["query_id"].unique(maintain_order=True).to_list()
    query_number = {value: number for number, value in enumerate(query_ids)}
    labelled = context.qrels.filter(pl.col("query_id").is_in(query_ids))
    passages = pl.concat(
        [keys["positive_id"], keys["negative_ids"].explode(), labelled["doc_id"]], how="vertical"
    ).unique(maintain_order=True)
    doc_number = {value: number for number, value in enumerate(passages.to_list())}
    doc_vectors = _vectors(passages.to_list(), context.doc_ids, context.doc_vectors)
    # Passages answering a labelled positive: itself, its copies (same text) and near-copies (cosine).
    answers: dict[int, set[int]] = {doc_number[d]: {doc_number[d]} for d in labelled["doc_id"].unique().to_list()}
    hashes = (
        pl.DataFrame({"doc_id": passages})
        .join(context.text_hashes, on="doc_id", how="left")
        .with_row_index("number")
        .filter(pl.col("text_hash").is_not_null())
    )
    for group in hashes.group_by("text_hash").agg(pl.col("number")).filter(pl.col("number").list.len() > 1)["number"]:
        for member in group:
            if member in answers:
                answers[member].update(group)
    _add_near_copies(answers, doc_vectors, context.near_copy)
    forbidden = [set[int]() for _ in query_ids]
    for query_id, doc_id in labelled.select("query_id", "doc_id").iter_rows():
        forbidden[query_number[query_id]] |= answers[doc_number[doc_id]]
    docs = [
        frozenset([doc_number[positive], *(doc_number[n] for n in negatives if context.check_negatives)])
        for positive, negatives in keys.select("positive_id", "negative_ids").iter_rows()
    ]
    return TrainingRows(
        query=ids_to_numbers(keys["query_id"], query_number),
        positive=ids_to_numbers(keys["positive_id"], doc_number),
        docs=docs,
        forbidden=[frozenset(f) for f in forbidden],
        query_vectors=_vectors(query_ids, context.query_ids, context.query_vectors),
        doc_vectors=doc_vectors,
    )


def _add_near_copies(answers: dict[int, set[int]], doc_vectors: np.ndarray, threshold: float) -> None:
    """Add to each labelled positive's set the passages whose cosine with it is at least `threshold`."""
    import faiss

    if not answers:
        return
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(np.ascontiguousarray(doc_vectors))
    positives = np.array(sorted(answers), dtype=np.int64)
    limits, _, found = index.range_search(np.ascontiguousarray(doc_vectors[positives]), float(threshold))
    for at, positive in enumerate(positives):
        answers[int(positive)].update(int(doc) for doc in found[limits[at] : limits[at + 1]])
