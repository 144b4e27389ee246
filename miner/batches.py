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

Last, all batches at once: built one after another, the last ones are the least hard (on Cranfield at 32, below a
random order's). A local search exchanges two rows of different batches, or a placed row with an unplaced one,
whenever that raises the total hardness sum and brings no conflict: each placed row in turn (those adding least to
their batch first) with its best partner among all rows (`_exchanged`); then each query's rows are assigned anew
(the Hungarian step again); EXCHANGE_PASSES times. The batch sums make an exchange's gain a few lookups per
candidate row, and kept counts (each batch's rows per query, and rows hitting each query) its feasibility, so one
row's best partner among 16,000 costs about 0.2 ms. The rows placed stay as many. What it can do is bounded by the
conflicts more than by the order of building: without any conflict (on the same rows and vectors, measured with a
separate script not kept), the greedy build alone reaches 1.42x a random order on Cranfield at 32 (six exchange
passes: 1.50x) and 1.39x on CISI at 8, where with them it reaches 1.18x and 1.21x: the hardest in-batch negatives are
the neighbouring queries' rows, which share judged passages. Tried on Cranfield at 32 and dropped: shortlists of
partners, the rows of the 8 / 32 / 96 batches a row fits best (1.20x / 1.21x / 1.22x after three passes, against
1.24x with all rows as partners) or the 64 rows of best gain with only their conflicts checked (1.18x): the best
exchanges that fit are mostly far down such lists, the top ones conflicting; and annealing (accepting losing
exchanges early, at one seeded falling temperature, on the 8-batch shortlist: 1.19x against 1.20x without).

What no full batch takes is unplaced: counted, never dropped silently and never put into a conflicting batch. The
order of the batches is shuffled; all of it is seeded.

How hard any order could be, whatever the algorithm, is bounded by `hardness_bound` (a relaxation of who meets
whom); bench/batches.py reports it beside this ordering's hardness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from miner.errors import InputError
from miner.vectors import gathered

log = logging.getLogger(__name__)

# Weight of how due a query is (its rows left per batch left, 1 = in every batch left) against how near its nearest
# fitting row is to the batch (the mean over the batch's rows of a sum of two cosines, the query's with their positives
# and theirs with its positive). Measured on Cranfield's and CISI's triplets (bench/batches.py's mined runs, seed
# 12345; rows placed, hardness x random order) with 0 / 1 / 2: Cranfield at 8: 99.3% 1.59x / 99.8% 1.61x / 99.9%
# 1.61x; at 32: 87.0% 1.23x / 96.9% 1.18x / 98.1% 1.16x; CISI at 8: 96.2% 1.22x / 99.8% 1.21x / 99.8% 1.21x; at 32:
# 29.2% 1.11x / 28.2% 1.07x / 28.4% 1.06x. Without it, queries with many rows are left over at the end (Cranfield at
# 32, CISI at 8); beyond 1, more placed rows cost hardness everywhere.
BALANCE = 1.0

# Passes of the exchange search over every placed row, each followed by the Hungarian step (see `_exchanged`).
# Measured on the same runs (hardness x random order; ordering time, seconds, on one core) with 0 / 1 / 2 / 3 / 4
# passes: Cranfield at 32: 1.177x 2.8 s / 1.229x 5.0 s / 1.240x 6.4 s / 1.245x 7.3 s / 1.247x 9.3 s; CISI at 8:
# 1.208x 6.4 s / 1.241x 12.5 s / 1.246x 17.0 s / 1.249x 21.2 s / 1.250x 25.8 s. Each pass gains about a third of
# the one before on both; two keep the ordering within 2.3x (Cranfield) and 2.7x (CISI) its time without, a third
# would add 0.003 to 0.005 for 3.3x on CISI.
EXCHANGE_PASSES = 2
# A pass costs each placed row a look at every other row (about 0.2 ms per row at 16,000 rows, growing with the
# rows): quadratic. Above this many rows the passes are left out, with a line in the log, so a large export's
# ordering stays near the greedy build's time (at this bound about 0.6 ms a row, half a minute a pass).
EXCHANGE_MAX_ROWS = 50_000
# The search also keeps tables of queries x (distinct positives + batches), 8 bytes a cell: above this many cells
# (400 MB) it is left out the same way. Cranfield's and CISI's runs need under a million.
EXCHANGE_MAX_CELLS = 50_000_000
# An exchange counts as a gain only above this: float rounding in the running sums is far below it.
GAIN_FLOOR = 1e-9


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


def order_batches(rows: TrainingRows, size: int, seed: int, exchange_passes: int = EXCHANGE_PASSES) -> BatchOrder:
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
    cells = queries * (len(np.unique(rows.positive)) + len(grouped))
    if exchange_passes and (count > EXCHANGE_MAX_ROWS or cells > EXCHANGE_MAX_CELLS):
        log.info(
            "batches: %d rows and tables of %d cells, more than %d and %d; exchanges between batches left out",
            count,
            cells,
            EXCHANGE_MAX_ROWS,
            EXCHANGE_MAX_CELLS,
        )
        exchange_passes = 0
    for _ in range(exchange_passes):
        # An exchange moves one row of a query; each query's rows are then assigned anew all at once, which finds
        # what single exchanges cannot. On the same runs with three passes (Cranfield at 8 and 32, CISI at 8 and 32,
        # hardness x random order): 1.672x / 1.239x / 1.240x / 1.103x without it, 1.676x / 1.245x / 1.249x / 1.122x
        # with it after each pass, for under 1 s more.
        grouped = _exchanged(rows, graph, grouped, _unplaced(grouped, count))
        grouped = _best_rows(rows, graph, grouped, _unplaced(grouped, count))
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


def _unplaced(grouped: np.ndarray, count: int) -> np.ndarray:
    """Whether each of `count` rows is in none of the batches."""
    left = np.ones(count, dtype=bool)
    left[grouped.reshape(-1)] = False
    return left


def _exchanged(rows: TrainingRows, graph: ConflictGraph, grouped: np.ndarray, left: np.ndarray) -> np.ndarray:
    """The batches after one pass of a local search that exchanges rows between batches, or with unplaced rows,
    whenever that raises the total hardness sum and brings no conflict.

    The pass takes every placed row in turn, those that add least to their batch first (most of the gain is
    there), and exchanges it with the row, anywhere, whose exchange raises the sum most without a conflict, if any
    does. The rows placed stay as many; the batches stay conflict-free after every exchange.
    """
    if grouped.size == 0:
        return grouped
    state = _Exchanges.of(rows, graph, grouped, left)
    placed = grouped.reshape(-1)
    # What each adds to its batch's sum: its cosines with the others' positives and queries.
    adds = state.standing[placed] - 2 * state.own[placed]
    for row in placed[np.argsort(adds, kind="stable")]:
        partner, _ = state.best_partner(int(row))
        if partner >= 0:
            state.exchange(int(row), partner)
    return state.grouped_rows


@dataclass
class _Exchanges:
    """Batches as tables that make an exchange's gain and feasibility a few lookups per candidate row.

    Batch number `batches` stands for the unplaced rows: no sums, no members, nothing to conflict with.
    """

    rows: TrainingRows
    graph: ConflictGraph
    grouped_rows: np.ndarray  # (batches, size) row numbers
    unplaced: np.ndarray  # row numbers
    batch_of: np.ndarray  # (rows,) batch of each row; `batches` when unplaced
    slot_of: np.ndarray  # (rows,) its place in its batch's row of `grouped_rows`, or in `unplaced`
    positive_of: np.ndarray  # (rows,) number of each row's positive among the distinct ones
    query_vectors: np.ndarray  # (queries, dim)
    positives: np.ndarray  # (distinct positives, dim)
    cosine: np.ndarray  # (queries, distinct positives)
    own: np.ndarray  # (rows,) cosine of each row's query with its positive
    query_sums: np.ndarray  # (batches + 1, dim)
    positive_sums: np.ndarray  # (batches + 1, dim)
    query_to_batch: np.ndarray  # (queries, batches + 1): each query's cosine with each batch's positive sum
    positive_to_batch: np.ndarray  # (distinct positives, batches + 1): with each batch's query sum
    members: np.ndarray  # (queries, batches + 1): rows of each query in each batch
    hit_in: np.ndarray  # (queries, batches + 1): rows in each batch that hit each query
    # Per row, kept up to date on every exchange: its query's cosine with its batch's positive sum plus its
    # positive's with the batch's query sum (0 when unplaced); and what of its exchange's gain depends on it alone
    # (see `gains`).
    standing: np.ndarray
    base: np.ndarray

    @staticmethod
    def of(rows: TrainingRows, graph: ConflictGraph, grouped: np.ndarray, left: np.ndarray) -> _Exchanges:
        batches, size = grouped.shape
        queries, count = len(rows.forbidden), len(rows.query)
        unplaced = np.flatnonzero(left)
        batch_of = np.full(count, batches, dtype=np.int64)
        batch_of[grouped.reshape(-1)] = np.repeat(np.arange(batches), size)
        slot_of = np.zeros(count, dtype=np.int64)
        slot_of[grouped.reshape(-1)] = np.tile(np.arange(size), batches)
        slot_of[unplaced] = np.arange(len(unplaced))
        distinct, positive_of = np.unique(rows.positive, return_inverse=True)
        query_vectors = rows.query_vectors.astype(np.float64)
        positives = rows.doc_vectors[distinct].astype(np.float64)
        cosine = query_vectors @ positives.T
        placed = batch_of < batches
        query_sums = np.zeros((batches + 1, query_vectors.shape[1]))
        positive_sums = np.zeros_like(query_sums)
        np.add.at(query_sums, batch_of[placed], query_vectors[rows.query[placed]])
        np.add.at(positive_sums, batch_of[placed], positives[positive_of[placed]])
        members = np.zeros((queries, batches + 1), dtype=np.int32)
        np.add.at(members, (rows.query[placed], batch_of[placed]), 1)
        hitter = np.repeat(np.arange(count), np.diff(graph.hits_start))
        hit_in = np.zeros((queries, batches + 1), dtype=np.int32)
        np.add.at(hit_in, (graph.hits, batch_of[hitter]), 1)
        hit_in[:, batches] = 0
        own = cosine[rows.query, positive_of]
        query_to_batch = query_vectors @ positive_sums.T
        positive_to_batch = positives @ query_sums.T
        standing = query_to_batch[rows.query, batch_of] + positive_to_batch[positive_of, batch_of]
        return _Exchanges(
            rows=rows,
            graph=graph,
            grouped_rows=grouped.copy(),
            unplaced=unplaced,
            batch_of=batch_of,
            slot_of=slot_of,
            positive_of=positive_of,
            query_vectors=query_vectors,
            positives=positives,
            cosine=cosine,
            own=own,
            query_sums=query_sums,
            positive_sums=positive_sums,
            query_to_batch=query_to_batch,
            positive_to_batch=positive_to_batch,
            members=members,
            hit_in=hit_in,
            standing=standing,
            base=np.where(placed, 2 * own - standing, 0.0),
        )

    def best_partner(self, row: int) -> tuple[int, float]:
        """The row whose exchange with `row` raises the total hardness sum most without a conflict, and by how
        much; (-1, 0.0) when none raises it."""
        gains = self.gains(row)
        best = int(np.argmax(gains))
        return (best, float(gains[best])) if gains[best] > GAIN_FLOOR else (-1, 0.0)

    def gains(self, row: int) -> np.ndarray:
        """What exchanging `row` with each row adds to the total hardness sum; -inf where that brings a conflict
        (or changes nothing: rows of its own batch)."""
        query_of, positive_of, batch_of = self.rows.query, self.positive_of, self.batch_of
        query, positive, batch = int(query_of[row]), int(positive_of[row]), int(batch_of[row])
        # Row r (query vector q, positive p) of batch a swaps with row s (q', p') of batch b. With dq = q' - q and
        # dp = p' - p, batch a's sum changes by dq . P_a + Q_a . dp + dq . dp, batch b's by -dq . P_b - Q_b . dp +
        # dq . dp: the rows' own pairs cancel. When s is unplaced, b has no sums, dq . dp counts once and a's own
        # pair changes from r's to s's. Grouped by what each term depends on: s's query, s's positive, s's batch,
        # s alone (`base`), and r alone.
        by_query = self.query_to_batch[:, batch] - 2 * self.cosine[:, positive]
        by_positive = self.positive_to_batch[:, batch] - 2 * self.cosine[query]
        by_batch = self.query_to_batch[query] + self.positive_to_batch[positive]
        gain = by_query[query_of] + by_positive[positive_of] + by_batch[batch_of] + self.base
        gain += 2 * self.own[row] - self.query_to_batch[query, batch] - self.positive_to_batch[positive, batch]
        # Feasible: r meets, in b without s, no row of its query, none it hits and none hitting it; s meets in a
        # without r the same. Six counts (rows of r's query in b, b's queries r hits, b's rows hitting r's query,
        # and the same for s in a), each with s's (or r's) own part taken off: in a conflict-free state each is at
        # least 0 for s in a batch, so their sum is 0 exactly when the exchange fits.
        count = len(batch_of)
        row_hits = np.zeros(len(self.rows.forbidden), dtype=np.int64)  # per query: whether r hits it
        row_hits[self.graph.hits_of(row)] = 1
        hits_query = np.zeros(count, dtype=np.int64)  # per row: whether it hits r's query
        hits_query[self.graph.hit_by_of(query)] = 1
        a_queries = np.flatnonzero(self.members[:, batch])
        others = [self.graph.hit_by_of(int(q)) for q in a_queries if q != query]
        hitting_others = np.bincount(np.concatenate([np.zeros(0, dtype=np.int64), *others]), minlength=count)
        into_b = self.members[query] + self.hit_in[query] + self.members[self.graph.hits_of(row)].sum(axis=0)
        into_a = self.members[:, batch] + self.hit_in[:, batch] - 2 * row_hits
        into_a[query] -= 2  # s of r's query: it is no row of another query in b, nor r in a
        fits = into_b[batch_of] + into_a[query_of] + hitting_others - hits_query == 0
        # An unplaced s has no batch: only its own side counts (each of its three counts at least 0 again), and
        # its cross term counts once.
        if len(self.unplaced):
            unplaced = self.unplaced
            their_query = query_of[unplaced]
            gain[unplaced] += self.cosine[their_query, positive] + self.cosine[query, positive_of[unplaced]]
            own_side = into_a[their_query] + row_hits[their_query] + (their_query == query) + hitting_others[unplaced]
            fits[unplaced] = own_side == 0
        fits[self.grouped_rows[batch]] = False  # r's own batch: nothing to exchange
        gain[~fits] = -np.inf
        return gain

    def exchange(self, row: int, other: int) -> None:
        """Swap the places of two rows, keeping every table up to date."""
        batches = self.members.shape[1] - 1
        for leaving, coming in ((row, other), (other, row)):
            batch = int(self.batch_of[leaving])
            if batch == batches:
                self.unplaced[self.slot_of[leaving]] = coming
                continue
            self.grouped_rows[batch, self.slot_of[leaving]] = coming
            out_query, in_query = int(self.rows.query[leaving]), int(self.rows.query[coming])
            self.query_sums[batch] += self.query_vectors[in_query] - self.query_vectors[out_query]
            self.positive_sums[batch] += (
                self.positives[self.positive_of[coming]] - self.positives[self.positive_of[leaving]]
            )
            self.query_to_batch[:, batch] = self.query_vectors @ self.positive_sums[batch]
            self.positive_to_batch[:, batch] = self.positives @ self.query_sums[batch]
            self.members[out_query, batch] -= 1
            self.members[in_query, batch] += 1
            self.hit_in[self.graph.hits_of(leaving), batch] -= 1
            self.hit_in[self.graph.hits_of(coming), batch] += 1
        self.batch_of[[row, other]] = self.batch_of[[other, row]]
        self.slot_of[[row, other]] = self.slot_of[[other, row]]
        pair = np.array([row, other])
        touched = np.unique(self.batch_of[pair])
        touched = touched[touched < batches]
        moved = np.concatenate([self.grouped_rows[touched].reshape(-1), pair])
        self.standing[moved] = (
            self.query_to_batch[self.rows.query[moved], self.batch_of[moved]]
            + self.positive_to_batch[self.positive_of[moved], self.batch_of[moved]]
        )
        self.base[moved] = np.where(self.batch_of[moved] < batches, 2 * self.own[moved] - self.standing[moved], 0.0)


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


def hardness_bound(
    rows: TrainingRows, size: int, placed: int, reached: float | None = None, steps: int = 400
) -> float | None:
    """A hardness (`batch_hardness`) that no conflict-free order of `rows` into batches of `size` placing `placed`
    rows can exceed; None when no such order exists (proved by the same relaxation; see below).

    `reached` is the hardness of an order that does place them (the export's), if there is one: it only sets the
    step size, and the bound then comes closer in as many steps.

    Who meets whom, relaxed. Let z[i, q] be 1 when row i shares its batch with a row of query q. In every
    conflict-free order: a placed row meets `size - 1` queries and an unplaced row none; a row meets neither its own
    query nor a query it hits; a query has at most `placed // size` rows placed (one a batch); and, for every two
    queries a and b, the rows of a meeting b are as many as the rows of b meeting a (one each per batch holding
    both). The hardness sum is the sum of z[i, q] * cos(query q, positive of row i). Only one thing is left out:
    that the queries a row meets also meet each other.

    The last family of constraints is priced instead of kept (Lagrangian relaxation): with a price w[a, b] =
    -w[b, a] per pair, a row of a earns cos - w[a, b] for meeting b. Without those constraints the best z is exact
    and cheap: each row meets the `size - 1` queries it earns most from, and the rows placed are the best `placed`
    with at most `placed // size` of a query. Its value bounds every order's sum whatever the prices (an order
    meets the priced constraints, so the prices add nothing to its sum). Subgradient steps lower the prices
    toward the best bound; the lowest value seen is returned. On CISI's rows at 8 (15,528 placed), 400 steps gave
    0.41238, against 0.41205 for the exact optimum of the same relaxation as a linear programme (HiGHS).

    It holds a table of rows x queries (8 bytes a cell) and takes each step a pass over it: a benchmark's tool for
    runs of tens of thousands of rows (CISI's 15,570 rows, 400 steps: 10-18 s), not part of the export.

    When no order exists, the values fall without end: once one is below what the least a placed row could add
    (`size - 1` of its lowest cosines with queries it may meet) makes of `placed` rows, no order can exist either.
    """
    if placed % size:
        raise ValueError(f"{placed} rows do not fill batches of {size}")
    if placed == 0:
        return float("nan")
    graph = conflict_graph(rows)
    queries, count, meets = len(rows.forbidden), len(rows.query), size - 1
    per_query = placed // size
    earns = (rows.doc_vectors[rows.positive] @ rows.query_vectors.T).astype(np.float64)  # (rows, queries)
    earns[np.arange(count), rows.query] = -np.inf
    earns[np.repeat(np.arange(count), np.diff(graph.hits_start)), graph.hits] = -np.inf
    # Rows sorted by query: where each one's query starts, to rank the rows within their query.
    sorted_queries = np.sort(rows.query)
    starts = np.searchsorted(sorted_queries, sorted_queries)
    rank_in_query = np.empty(count, dtype=np.int64)
    # The least any order's sum can be, and the step's target when no order's hardness is known: an order's sum is
    # at least this, so a value below it proves that none exists.
    least = float(np.sort(np.where(np.isfinite(earns), earns, np.inf), axis=1)[:, :meets].sum(axis=1).min()) * placed
    target = least - 1.0 if reached is None else reached * placed * meets
    prices = np.zeros((queries, queries))
    lowest = np.inf
    for _ in range(steps + 1):
        priced = earns - prices[rows.query]
        met = np.argpartition(-priced, meets - 1, axis=1)[:, :meets]
        value = np.take_along_axis(priced, met, axis=1).sum(axis=1)  # -inf: fewer than size - 1 queries to meet
        # The best `placed` rows, at most `per_query` of a query: a query's best rows first, then the best of those.
        rank_in_query[np.lexsort((-value, rows.query))] = np.arange(count) - starts
        eligible = np.flatnonzero((rank_in_query < per_query) & np.isfinite(value))
        if len(eligible) < placed:
            return None
        chosen = eligible[np.argsort(-value[eligible], kind="stable")[:placed]]
        total = float(value[chosen].sum())
        lowest = min(lowest, total)
        if lowest < least - 1e-9 * max(1.0, abs(least)):  # below by more than rounding
            return None
        meetings = np.zeros((queries, queries))
        np.add.at(meetings, (np.repeat(rows.query[chosen], meets), met[chosen].reshape(-1)), 1)
        imbalance = meetings - meetings.T  # a's rows meeting b, less b's meeting a: 0 in every order
        squares = float((imbalance**2).sum())
        if squares == 0:
            break  # the relaxed best is an order's meetings: nothing to price
        # Polyak's step toward the target, halved: the bound lies between `reached` and the value.
        prices += 0.5 * (total - target) / squares * imbalance
    return lowest / (placed * meets)


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
