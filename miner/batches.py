"""Batch-aware export: rows ordered so that each run of `size` consecutive rows is one training batch.

With in-batch-negative losses (MultipleNegativesRankingLoss and its cached variants), every other row's
positive and negatives in a batch are negatives for a row's query. Two things then matter, and a shuffling
trainer leaves both to chance:

- no in-batch false negatives: no row may bring into a batch a passage that answers another row's query
  there: one of that query's labelled positives, a copy of one (same text), or a near-copy (cosine with one of
  them at least `near_copy`, in the embedding model's space). Rows of one query never share a batch either.
- hard in-batch negatives: as in TAS-Balanced (Hofstätter et al., 2021), each batch is one topic cluster, on the
  run's own embeddings. A batch's hardness sum (each row's query with every other row's positive) is
  (sum of its queries) . (sum of its positives), less each row's own pair: it grows with how near each row's
  query is to the others' positives and its positive to the others' queries. Here the cluster forms around the
  batch's first row rather than being a fixed k-means cluster, and it is a cluster of rows: which of a query's
  rows (which positive) joins a batch matters as much as which queries do.

The conflicts, as a graph: a row hits each other query that one of its passages answers (it may share a batch
with no row of that query). How many batches the counts allow is known first: n batches take at most min(rows, n)
rows of a query, so the most batches is the largest n with those adding up to size * n (`batches_possible`). A
query with a row left for every batch still planned is due: left out, one of its rows would have no batch.

How a batch is built: it grows a query at a time, and which row each query brings stays open until the batch is
full. A query may join while it has a row left that hits no query of the batch and every query of the batch keeps
such a row that does not hit it either; two queries exclude each other when every fitting row of one hits the
other. The first query is the most due (rows left per batch left), with its row that hits most queries (the
hardest to place later); due queries join next; then the query whose fitting row is nearest the rows the batch
has so far, weighed (BALANCE) against how due it is, so that queries with many rows are not left over at the end
where they could only meet each other. Queries that would keep out more of the open ones than the batch can spare
per slot left wait: a topic cluster's queries tend to share labelled passages, and a greedy cluster otherwise runs
dry before it is full. When the cluster cannot fill the batch, any queries will do (most rows left first); when
the due queries cannot all meet, the same without them; then each of the next queries with most rows left
(as many as a batch holds) starts one in turn. When none of that fills a batch, the ordering stops.

Then each query's rows are chosen anew: with every batch's queries fixed, what a query's row adds to a batch's
hardness sum depends only on its positive and the batch's other queries, so each query's rows (its rows left over
included) are assigned to its batches exactly (the Hungarian method), among the placements without a conflict.
What no full batch takes is unplaced: counted, never dropped silently and never put into a conflicting batch. The
order of the batches is shuffled; all of it is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from miner.errors import InputError
from miner.vectors import gathered

# Weight of how due a query is (its rows left per batch left, 1 = in every batch left) against how near its nearest
# fitting row is to the batch (the mean over the batch's rows of a sum of two cosines, the query's with their positives
# and theirs with its positive). Measured on Cranfield's and CISI's triplets (bench/batches.py's mined runs, seed
# 12345; rows placed, hardness x random order) with 0 / 1 / 2: Cranfield at 8: 99.3% 1.59x / 99.8% 1.61x / 99.9%
# 1.61x; at 32: 87.0% 1.23x / 96.9% 1.18x / 98.1% 1.16x; CISI at 8: 96.2% 1.22x / 99.8% 1.21x / 99.8% 1.21x; at 32:
# 29.2% 1.11x / 28.2% 1.07x / 28.4% 1.06x. Without it, queries with many rows are left over at the end (Cranfield at
# 32, CISI at 8); beyond 1, more placed rows cost hardness everywhere.
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


@dataclass(frozen=True)
class ConflictGraph:
    """Who may not meet whom, as index lists (the entries of item i are `values[start[i]:start[i + 1]]`).

    A row's hits are the queries, other than its own, that one of its passages answers: the row may share a batch
    with no row of them. Rows of one query never share a batch either.
    """

    hits_start: np.ndarray  # per row: the queries it hits
    hits: np.ndarray
    hit_by_start: np.ndarray  # per query: the rows that hit it
    hit_by: np.ndarray
    rows_start: np.ndarray  # per query: its rows
    rows_of: np.ndarray

    def hits_of(self, row: int) -> np.ndarray:
        return self.hits[self.hits_start[row] : self.hits_start[row + 1]]

    def hit_by_of(self, query: int) -> np.ndarray:
        return self.hit_by[self.hit_by_start[query] : self.hit_by_start[query + 1]]

    def rows_of_query(self, query: int) -> np.ndarray:
        return self.rows_of[self.rows_start[query] : self.rows_start[query + 1]]


def _grouped(owner: np.ndarray, value: np.ndarray, owners: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, values) of `value` grouped by `owner` (0..owners-1), each group in increasing order."""
    order = np.lexsort((value, owner))
    start = np.zeros(owners + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=owners), out=start[1:])
    return start, value[order].astype(np.int64)


def conflict_graph(rows: TrainingRows) -> ConflictGraph:
    """Which queries each row hits, from the passages it brings and those that answer each query."""
    queries, count = len(rows.forbidden), len(rows.query)
    answering: dict[int, list[int]] = {}
    for query, passages in enumerate(rows.forbidden):
        for passage in passages:
            answering.setdefault(passage, []).append(query)
    pairs = sorted(
        {
            (row, query)
            for row, passages in enumerate(rows.docs)
            for passage in passages
            for query in answering.get(passage, ())
            if query != rows.query[row]
        }
    )
    hit = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return ConflictGraph(
        *_grouped(hit[:, 0], hit[:, 1], count),
        *_grouped(hit[:, 1], hit[:, 0], queries),
        *_grouped(rows.query.astype(np.int64), np.arange(count, dtype=np.int64), queries),
    )


def batches_possible(rows_per_query: np.ndarray, size: int) -> int:
    """The most batches of `size` distinct queries the rows allow, conflicts aside: n batches take at most
    min(rows, n) rows of each query, so n is possible only if those add up to size * n."""
    low, high = 0, int(rows_per_query.sum()) // size
    while low < high:
        middle = (low + high + 1) // 2
        if np.minimum(rows_per_query, middle).sum() >= size * middle:
            low = middle
        else:
            high = middle - 1
    return low


def order_batches(rows: TrainingRows, size: int, seed: int) -> BatchOrder:
    """Rows grouped into conflict-free batches of exactly `size`, each a topic cluster of rows."""
    rng = np.random.default_rng(seed)
    graph = conflict_graph(rows)
    queries, count = len(rows.forbidden), len(rows.query)
    # Among equals, a seeded order rather than the input's: argmax takes the first.
    order = _Order(query=rng.permutation(queries), row=rng.permutation(count))
    left = np.ones(count, dtype=bool)
    remaining = np.bincount(rows.query, minlength=queries)
    planned = batches_possible(remaining, size)
    affinity = _Affinity.of(rows)
    batches: list[np.ndarray] = []
    while planned > len(batches):
        batches_left = planned - len(batches)
        # A query with a row left for every batch still planned is due: leaving it out leaves one of its rows
        # with no batch.
        due = remaining >= batches_left
        none_due = np.zeros_like(due)
        batch = None
        # The topic cluster; when it runs out of queries it may meet, any queries (most rows left first); when the
        # due queries cannot all meet, the same without them.
        for must, by_topic in ((due, True), (due, False), (none_due, True), (none_due, False)):
            batch = _batch(rows, graph, affinity, left, remaining / batches_left, must, size, order, by_topic)
            if batch is not None:
                break
        # Another query may yet start one: of the queries with most rows left, as many as a batch holds (that
        # bounds the work where nothing fits any more; on CISI at 32, trying every query placed no more).
        starts = np.argsort(-remaining, kind="stable")
        for first in starts[remaining[starts] > 0][1 : size + 1] if batch is None else []:
            batch = _batch(
                rows, graph, affinity, left, remaining / batches_left, none_due, size, order, True, int(first)
            )
            if batch is not None:
                break
        if batch is None:
            break  # the rows left are unplaced
        left[batch] = False
        np.subtract.at(remaining, rows.query[batch], 1)
        batches.append(batch)
    grouped = _best_rows(rows, graph, np.array(batches, dtype=np.int64).reshape(-1, size), left)
    shuffled = grouped[rng.permutation(len(grouped))]
    numbers = np.repeat(np.arange(len(shuffled), dtype=np.int32), size)
    return BatchOrder(shuffled.reshape(-1), numbers, count - grouped.size)


@dataclass(frozen=True)
class _Order:
    """Seeded orders of the queries and rows, to choose among equals."""

    query: np.ndarray
    row: np.ndarray


@dataclass(frozen=True)
class _Affinity:
    """The run's vectors, arranged to score how hard rows are as each other's in-batch negatives."""

    query_vectors: np.ndarray  # (queries, dim)
    positives: np.ndarray  # (distinct positives, dim)
    positive_of: np.ndarray  # (rows,) number in `positives` of each row's positive

    @staticmethod
    def of(rows: TrainingRows) -> _Affinity:
        distinct, positive_of = np.unique(rows.positive, return_inverse=True)
        return _Affinity(rows.query_vectors, rows.doc_vectors[distinct], positive_of)

    def with_row(self, rows: TrainingRows, row: int) -> np.ndarray:
        """For every row, the cosine of its query with `row`'s positive plus that of `row`'s query with its
        positive: what the two add to the batch's hardness sum when they meet."""
        to_positive = self.query_vectors @ rows.doc_vectors[rows.positive[row]]
        to_query = self.positives @ rows.query_vectors[rows.query[row]]
        return to_positive[rows.query] + to_query[self.positive_of]


def _batch(
    rows: TrainingRows,
    graph: ConflictGraph,
    affinity: _Affinity,
    left: np.ndarray,
    due_ratio: np.ndarray,
    due: np.ndarray,
    size: int,
    order: _Order,
    by_topic: bool,
    first: int | None = None,
) -> np.ndarray | None:
    """One conflict-free batch of `size` rows left, or None when this way of building one finds none.

    The batch grows a query at a time; which of its rows a query brings stays open until the end. A query may join
    when it has a row left that hits no query of the batch, and every query of the batch keeps such a row that does
    not hit it either. `due` queries join first; then (`by_topic`) the query whose fitting row nearest the batch is
    nearest, weighed against how due it is (`due_ratio`: rows left per batch left), or else the one with most rows.
    """
    queries = len(due)
    fits = left.copy()  # rows left that hit no query of the batch
    member = np.zeros(queries, dtype=bool)
    gain = np.zeros(len(fits))  # per row: its affinity with the rows brought so far
    brought: dict[int, int] = {}
    hit_counts = np.diff(graph.hits_start)

    def join(row: int) -> None:
        query = int(rows.query[row])
        member[query] = True
        brought[query] = row
        fits[graph.hit_by_of(query)] = False
        gain[:] += affinity.with_row(rows, row)

    def nearest_row(query: int) -> int:
        candidates = graph.rows_of_query(query)[fits[graph.rows_of_query(query)]]
        top = candidates[gain[candidates] == gain[candidates].max()]
        return int(top[np.argmin(order.row[top])])

    by_rank = np.argsort(order.query)
    if first is None:
        first = int(by_rank[np.argmax(due_ratio[by_rank])])
    # Its first row: the one hitting most queries, the hardest to place in a later batch.
    candidates = graph.rows_of_query(first)[fits[graph.rows_of_query(first)]]
    if len(candidates) == 0:
        return None
    join(int(candidates[np.argmax(hit_counts[candidates])]))
    while (slots := size - len(brought)) > 0:
        open_, keeps_out = _may_join(rows.query, graph, fits, member)
        if not open_.any():
            return None
        # The batch spends its spare queries (those open beyond the slots left) at an even pace: only queries that
        # keep out no more than the spare per slot (or the fewest any keeps out) may join. Without it, a topic
        # cluster fills with queries that exclude each other's neighbours and runs dry before it is full.
        spare = np.count_nonzero(open_) - slots
        paced = open_ & (keeps_out <= max(keeps_out[open_].min(), spare / slots))
        if by_topic:
            nearness = np.full(queries, -np.inf)
            np.maximum.at(nearness, rows.query[fits], gain[fits])
            wish = nearness / len(brought) + BALANCE * due_ratio
        else:
            wish = due_ratio
        score = np.where(paced, np.where(due, np.inf, wish), -np.inf)[by_rank]
        join(nearest_row(int(by_rank[np.argmax(score)])))
    # A row chosen early may hit a query that joined after it: then its query's nearest row that fits.
    return np.array([row if fits[row] else nearest_row(query) for query, row in brought.items()], dtype=np.int64)


def _may_join(
    query_of: np.ndarray, graph: ConflictGraph, fits: np.ndarray, member: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Which queries may join the batch, and how many of those each would keep out by joining: queries a and b
    exclude each other when every fitting row of a hits b."""
    queries = len(member)
    fitting = np.bincount(query_of[fits], minlength=queries)
    open_ = (fitting > 0) & ~member
    kept = np.flatnonzero(fits)
    lengths = graph.hits_start[kept + 1] - graph.hits_start[kept]
    owner = np.repeat(query_of[kept], lengths)
    hit = graph.hits[
        np.repeat(graph.hits_start[kept] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    ]
    pairs, times = _counted(owner * queries + hit, queries * queries)
    a, b = pairs // queries, pairs % queries
    exclusive = times == fitting[a]
    open_[b[exclusive & member[a]]] = False
    open_[a[exclusive & member[b]]] = False
    both_open = exclusive & open_[a] & open_[b]
    keeps_out = np.bincount(a[both_open], minlength=queries) + np.bincount(b[both_open], minlength=queries)
    return open_, keeps_out


def _counted(keys: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys (below `limit`) and how often each occurs."""
    if limit <= 1 << 24:  # a count per possible key is cheaper than sorting
        times = np.bincount(keys, minlength=limit)
        distinct = np.flatnonzero(times)
        return distinct, times[distinct]
    return np.unique(keys, return_counts=True)


def _best_rows(rows: TrainingRows, graph: ConflictGraph, grouped: np.ndarray, left: np.ndarray) -> np.ndarray:
    """The batches with the rows that make them hardest: each query keeps its batches, and which of its rows goes
    to which (its rows left over included) is chosen anew.

    With the queries of every batch fixed, the hardness sum depends on the row a query brings to a batch only
    through its positive's cosines with the batch's other queries, whichever rows those bring: each query's rows
    are an assignment problem of their own, solved exactly (the Hungarian method, scipy's linear_sum_assignment)
    among the placements that bring no conflict.
    """
    # Imported here: only the batched formats need scipy, and the command line starts faster without it.
    from scipy import sparse
    from scipy.optimize import linear_sum_assignment

    batches, size = grouped.shape
    if batches == 0:
        return grouped
    queries = len(rows.forbidden)
    grouped, left = grouped.copy(), left.copy()
    member_query = rows.query[grouped]
    membership = sparse.csr_matrix(
        (np.ones(grouped.size), (np.repeat(np.arange(batches), size), member_query.reshape(-1))),
        shape=(batches, queries),
    )
    hits = sparse.csr_matrix((np.ones(len(graph.hits)), graph.hits, graph.hits_start), shape=(len(rows.query), queries))
    query_sums = rows.query_vectors[member_query].sum(axis=1)
    places = np.argsort(member_query.reshape(-1), kind="stable")
    starts = np.searchsorted(member_query.reshape(-1)[places], np.arange(queries + 1))
    for query in range(queries):
        place = places[starts[query] : starts[query + 1]]
        batch, slot = place // size, place % size
        if len(place) == 0:
            continue
        own = graph.rows_of_query(query)
        candidates = np.concatenate([grouped[batch, slot], own[left[own]]])
        value = rows.doc_vectors[rows.positive[candidates]] @ (query_sums[batch] - rows.query_vectors[query]).T
        clash = (hits[candidates] @ membership[batch].T).toarray() > 0
        # Forbidden; the batches' current rows bring no conflict, so an assignment without one exists.
        value[clash] = -np.inf
        chosen, into = linear_sum_assignment(value, maximize=True)
        left[grouped[batch, slot]] = True
        grouped[batch[into], slot[into]] = candidates[chosen]
        left[candidates[chosen]] = False
    return grouped


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
