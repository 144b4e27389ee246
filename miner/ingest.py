"""Ingest: a BEIR folder, or a pairs table (+ corpus), into validated corpus / queries / qrels tables."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa

from miner import schema
from miner.errors import InputError
from miner.tables import FORMATS, Source, TableSpool, file_sha256, read_text_table, text_blocks, text_hash

log = logging.getLogger(__name__)

QUERY_TEXT_COLUMNS = ("query", "anchor")
CORPUS_ID_COLUMNS = ("_id", "doc_id", "id")


@dataclass(frozen=True)
class Ingested:
    corpus: pa.Table  # schema.CORPUS
    queries: pa.Table  # schema.QUERIES: only queries with at least one positive
    qrels: pa.Table  # schema.QRELS: positives only
    counts: dict[str, int] = field(default_factory=dict)
    input_hashes: dict[str, str] = field(default_factory=dict)


def ingest(
    data: Path,
    *,
    split: str | None = None,
    corpus: Path | None = None,
    queries: Path | None = None,
    min_relevance: int = 1,
    skip_unknown: bool = False,
    spill: Path | None = None,
) -> Ingested:
    """Read and validate the input; with `spill`, the corpus goes a block at a time to an Arrow file in that folder
    and comes back memory-mapped, so ingest holds one block of texts, not the corpus."""
    if data.is_dir():
        return read_beir(data, split=split, min_relevance=min_relevance, skip_unknown=skip_unknown, spill=spill)
    if data.is_file():
        return read_pairs(data, corpus=corpus, queries=queries, skip_unknown=skip_unknown, spill=spill)
    raise InputError(data, "no such file or folder", "give a BEIR folder or a pairs table (.jsonl/.csv/.parquet)")


# --- validation shared by both layouts -------------------------------------------------------------


def _require_ids(frame: pl.DataFrame, column: str, source: Source, what: str) -> None:
    _require_filled_ids(frame, column, source, what, 0)
    _require_unique_ids([(source, frame[column])], what)


def _require_filled_ids(frame: pl.DataFrame, column: str, source: Source, what: str, offset: int) -> None:
    """No empty id among `frame`'s rows, which start at row `offset` of the file."""
    empty = frame.with_row_index("_i").filter(_blank(column))
    if empty.height:
        raise source.fail(offset + int(empty["_i"][0]), f"empty {what} id", f"give every {what} a non-empty '{column}'")


def _require_unique_ids(files: list[tuple[Source, pl.Series]], what: str) -> None:
    """Every row's id, file by file in order, names one row only."""
    indexed = pl.concat(
        [
            ids.rename("id").to_frame().with_row_index("_i").with_columns(_file=pl.lit(n))
            for n, (_, ids) in enumerate(files)
        ]
    )
    duplicated = indexed.filter(pl.col("id").is_duplicated())
    if duplicated.height:
        first = duplicated.row(0, named=True)
        again = duplicated.filter(pl.col("id") == first["id"]).row(1, named=True)
        first_place = files[first["_file"]][0].fail(int(first["_i"]), "", "")
        where = f"line {first_place.line}" if first_place.line is not None else f"row {first_place.row}"
        if first["_file"] != again["_file"]:
            where = f"{first_place.where} {where}"
        raise files[again["_file"]][0].fail(
            int(again["_i"]), f"duplicate {what} id '{first['id']}' (first at {where})", "make ids unique"
        )


def corpus_files(path: Path) -> list[Path]:
    """A corpus file, or a folder of corpus shards (.jsonl/.csv/.tsv/.parquet files, read in name order)."""
    if not path.is_dir():
        return [path]
    shards = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    if not shards:
        raise InputError(path, "a corpus folder holds no file to read (.jsonl, .csv, .tsv, .parquet)", "add the shards")
    return shards


# Rows hashed at a time: normalising the text for its hash copies it, a slice at a time rather than the corpus.
HASH_SLICE = 65_536


def _with_hash(frame: pl.DataFrame) -> pl.DataFrame:
    hashes = [
        frame.slice(start, HASH_SLICE).select(text_hash=text_hash(pl.col("text"))).get_column("text_hash")
        for start in range(0, frame.height, HASH_SLICE)
    ]
    return frame.with_columns(pl.concat(hashes) if hashes else pl.Series("text_hash", [], pl.String))


def _blank(column: str) -> pl.Expr:
    return pl.col(column).is_null() | (pl.col(column).str.strip_chars() == "")


# --- BEIR folders -----------------------------------------------------------------------------------


def _choose_split(folder: Path, split: str | None) -> Path:
    qrels_dir = folder / "qrels"
    available = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if not available:
        raise InputError(qrels_dir, "no qrels/<split>.tsv file", "add the relevance judgements as qrels/<split>.tsv")
    if split is None:
        split = "train" if "train" in available else (available[0] if len(available) == 1 else None)
        if split is None:
            raise InputError(
                qrels_dir, f"several splits and none is 'train' ({', '.join(available)})", "choose one with --split"
            )
    if split not in available:
        raise InputError(
            qrels_dir / f"{split}.tsv", f"no such split (available: {', '.join(available)})", "choose one with --split"
        )
    return qrels_dir / f"{split}.tsv"


def _document_text(frame: pl.DataFrame) -> pl.DataFrame:
    """(_id, text[, title]) -> (doc_id, text): the passage a model sees is title + text."""
    title = pl.col("title").fill_null("").str.strip_chars() if "title" in frame.columns else pl.lit("")
    body = pl.col("text").fill_null("").str.strip_chars()
    # Many BEIR conversions already start the text with the title; do not say it twice.
    text = (
        pl.when((title == "") | body.str.starts_with(title))
        .then(body)
        .otherwise(pl.concat_str([title, body], separator=" "))
    )
    return frame.select(doc_id=pl.col("_id"), text=text)


@dataclass(frozen=True)
class Documents:
    """What reading a corpus file leaves in memory: its documents' keys; their texts went to the spool."""

    keys: pl.DataFrame  # (doc_id, text_hash) of every document with text, in file order
    empty_ids: pl.Series  # documents without text, skipped
    files: list[Path]  # the files read: the corpus file, or each shard of a corpus folder


def spool_documents(
    path: Path, spool: TableSpool, *, columns: list[str], optional: tuple[str, ...], id_column: str | None
) -> Documents:
    """Read a corpus file, or a folder of shards, a block at a time into `spool` as CORPUS rows (title joined to
    text, hashed).

    `id_column` None picks, in each file, the first of CORPUS_ID_COLUMNS it has. Only the ids of all blocks are
    held together, to find a duplicate wherever it is.
    """
    files = corpus_files(path)
    ids: list[tuple[Source, pl.Series]] = []
    keys: list[pl.DataFrame] = []
    empty: list[pl.Series] = []
    for file in files:
        source, blocks = text_blocks(file, columns, optional)
        column, file_ids, offset = id_column, [], 0
        for block in blocks:
            if column is None:
                column = _pick(block.columns, CORPUS_ID_COLUMNS)
                if column is None or "text" not in block.columns:
                    raise source.whole(
                        f"a corpus table needs an id column ({', '.join(CORPUS_ID_COLUMNS)}) and 'text' "
                        f"({source.columns_found()})",
                        "add or rename those columns",
                    )
            block = block.with_columns(pl.lit(None, pl.String).alias(c) for c in (column, "text") if c not in block)
            _require_filled_ids(block, column, source, "document", offset)
            offset += block.height
            file_ids.append(block[column])
            documents = _document_text(block.rename({column: "_id"}) if column != "_id" else block)
            empty.append(documents.filter(_blank("text"))["doc_id"])
            documents = _with_hash(documents.filter(~_blank("text")))
            spool.write(schema.conform(documents, schema.CORPUS))
            keys.append(documents.select("doc_id", "text_hash"))
        ids.append((source, pl.concat(file_ids)))
    _require_unique_ids(ids, "document")
    empty_ids = pl.concat(empty)
    # Empty documents occur in real BEIR corpora (Cranfield has two); they can be neither positive nor
    # negative, so they are skipped and counted instead of refusing the whole corpus.
    if empty_ids.len():
        log.warning(
            "%s: skipping %d empty documents (ids %s)", path, empty_ids.len(), ", ".join(empty_ids.head(5).to_list())
        )
    return Documents(pl.concat(keys), empty_ids, files)


def read_beir_queries(path: Path) -> pl.DataFrame:
    frame, source = read_text_table(path, ["_id", "text"])
    _require_ids(frame, "_id", source, "query")
    empty = frame.with_row_index("_i").filter(_blank("text"))
    if empty.height:
        raise source.fail(int(empty["_i"][0]), f"query '{empty['_id'][0]}' has no text", "give it text or remove it")
    return _with_hash(frame.select(query_id=pl.col("_id"), text=pl.col("text")))


def read_qrels(path: Path) -> tuple[pl.DataFrame, Source]:
    frame, source = read_text_table(path, ["query-id", "corpus-id", "score"])
    indexed = frame.with_row_index("_i")
    for column in ("query-id", "corpus-id"):
        empty = indexed.filter(_blank(column))
        if empty.height:
            raise source.fail(int(empty["_i"][0]), f"empty {column}", "fill it in or remove the row")
    scores = indexed.with_columns(relevance=pl.col("score").str.strip_chars().cast(pl.Int32, strict=False))
    bad = scores.filter(pl.col("relevance").is_null())
    if bad.height:
        raise source.fail(
            int(bad["_i"][0]), f"score '{bad['score'][0]}' is not a whole number", "use integer relevance grades"
        )
    return scores.select("_i", query_id="query-id", doc_id="corpus-id", relevance="relevance"), source


def _known_only(
    qrels: pl.DataFrame, source: Source, column: str, known: pl.Series, what: str, skip_unknown: bool
) -> tuple[pl.DataFrame, int]:
    unknown = qrels.filter(~pl.col(column).is_in(known.implode()))
    if unknown.height and not skip_unknown:
        row = unknown.row(0, named=True)
        raise source.fail(
            int(row["_i"]),
            f"unknown {what} id '{row[column]}' ({unknown.height} such rows)",
            f"fix the id, add the {what}, or pass --skip-unknown to skip such rows",
        )
    return qrels.filter(pl.col(column).is_in(known.implode())), unknown.height


def read_beir(
    folder: Path, *, split: str | None, min_relevance: int, skip_unknown: bool, spill: Path | None = None
) -> Ingested:
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = _choose_split(folder, split)
    for path in (corpus_path, queries_path):
        if not path.is_file():
            raise InputError(path, "file not found", "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/")
    with TableSpool(schema.CORPUS, spill) as spool:
        documents = spool_documents(corpus_path, spool, columns=["_id", "text"], optional=("title",), id_column="_id")
        if documents.keys.height == 0:
            raise InputError(corpus_path, "the corpus has no document with text", "add documents")
        queries = read_beir_queries(queries_path)
        qrels, source = read_qrels(qrels_path)
        corpus = spool.table()
    judged = qrels.height

    # An empty (skipped) document is known, not unknown: its judgements are dropped and counted.
    empty_ids = documents.empty_ids
    all_doc_ids = pl.concat([documents.keys["doc_id"], empty_ids])
    qrels, unknown_queries = _known_only(qrels, source, "query_id", queries["query_id"], "query", skip_unknown)
    qrels, unknown_documents = _known_only(qrels, source, "doc_id", all_doc_ids, "document", skip_unknown)
    judging_empty = qrels.filter(pl.col("doc_id").is_in(empty_ids.implode())).height
    qrels = qrels.filter(~pl.col("doc_id").is_in(empty_ids.implode()))

    positives = (
        qrels.filter(pl.col("relevance") >= min_relevance)
        .group_by("query_id", "doc_id")
        .agg(pl.col("relevance").max())
        .sort("query_id", "doc_id")
    )
    if positives.height == 0:
        raise InputError(
            qrels_path, f"no judgement with score >= {min_relevance}", "lower --min-relevance or check the qrels file"
        )
    counts = {
        "documents": corpus.num_rows,
        "documents_empty_skipped": empty_ids.len(),
        "queries": queries.height,
        "qrels_rows": judged,
        "qrels_unknown_query_skipped": unknown_queries,
        "qrels_unknown_document_skipped": unknown_documents,
        "qrels_empty_document_skipped": judging_empty,
    }
    return _ingested(corpus, queries, positives, counts, [*documents.files, queries_path, qrels_path])


def _ingested(
    corpus: pa.Table, queries: pl.DataFrame, positives: pl.DataFrame, counts: dict[str, int], files: list[Path]
) -> Ingested:
    """The stage's result: only queries that have a positive, tables in their contract schemas."""
    with_positive = queries.filter(pl.col("query_id").is_in(positives["query_id"].implode()))
    return Ingested(
        corpus=schema.conform(corpus, schema.CORPUS),
        queries=schema.conform(with_positive, schema.QUERIES),
        qrels=schema.conform(positives, schema.QRELS),
        counts={
            **counts,
            "queries_with_positives": with_positive.height,
            "queries_without_positive_skipped": queries.height - with_positive.height,
            "positives": positives.height,
        },
        input_hashes={str(path): file_sha256(path) for path in files},
    )


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in columns), None)


def read_pairs(
    path: Path, *, corpus: Path | None, queries: Path | None, skip_unknown: bool, spill: Path | None = None
) -> Ingested:
    """A table of (query, positive) rows, by text or by id; several rows per query give several positives.

    Positive texts missing from the corpus are added to it (with an id derived from their content), so
    a pairs table alone, like a sentence-transformers dataset, is a complete input.
    """
    pairs, source = read_text_table(path, [], optional=(*QUERY_TEXT_COLUMNS, "query_id", "positive", "positive_id"))
    query_text = _pick(pairs.columns, QUERY_TEXT_COLUMNS)
    query_id = _pick(pairs.columns, ("query_id",))
    positive_text = _pick(pairs.columns, ("positive",))
    positive_id = _pick(pairs.columns, ("positive_id",))
    if query_text is None and query_id is None:
        raise source.whole(f"no query column (looked for query, anchor, query_id; {source.columns_found()})", "add one")
    if positive_text is None and positive_id is None:
        raise source.whole(
            f"no positive column (looked for positive, positive_id; {source.columns_found()})", "add one"
        )
    if query_text is None and queries is None:
        raise source.whole("pairs name queries by id only", "pass --queries with their texts, or add a 'query' column")
    if positive_text is None and corpus is None:
        raise source.whole(
            "pairs name positives by id only", "pass --corpus with the documents, or add a 'positive' column"
        )
    if pairs.height == 0:
        raise source.whole("the pairs table has no rows", "add (query, positive) rows")
    rows = pairs.with_row_index("_i")
    for column in pairs.columns:
        blank = rows.filter(_blank(column))
        if blank.height:
            raise source.fail(int(blank["_i"][0]), f"empty '{column}'", "fill it in or remove the row")

    with TableSpool(schema.CORPUS, spill) as spool:
        documents = (
            spool_documents(corpus, spool, columns=[], optional=(*CORPUS_ID_COLUMNS, "text", "title"), id_column=None)
            if corpus is not None
            else Documents(
                pl.DataFrame(schema={"doc_id": pl.String, "text_hash": pl.String}),
                pl.Series("doc_id", [], pl.String),
                [],
            )
        )
        rows, keys, added = _positive_ids(rows, source, positive_text, positive_id, documents.keys, spool)
        documents_table = spool.table()

    if query_text is not None:
        rows = rows.with_columns(
            _query=pl.col(query_id) if query_id else pl.lit("q-") + text_hash(pl.col(query_text)).str.slice(0, 16)
        )
        query_table = _with_hash(rows.select(query_id=pl.col("_query"), text=pl.col(query_text))).unique(
            "query_id", keep="first", maintain_order=True
        )
    else:
        assert queries is not None
        query_table = read_beir_queries(queries)
        rows = rows.with_columns(_query=pl.col(query_id))

    qrels = rows.select("_i", query_id=pl.col("_query"), doc_id=pl.col("_positive"), relevance=pl.lit(1, pl.Int32))
    qrels, unknown_queries = _known_only(qrels, source, "query_id", query_table["query_id"], "query", skip_unknown)
    qrels, unknown_documents = _known_only(qrels, source, "doc_id", keys["doc_id"], "document", skip_unknown)
    positives = qrels.drop("_i").unique(["query_id", "doc_id"]).sort("query_id", "doc_id")
    if positives.height == 0:
        raise source.whole("no pair is left after skipping unknown ids", "check the ids")
    counts = {
        "documents": documents_table.num_rows,
        "documents_empty_skipped": documents.empty_ids.len(),
        "documents_added_from_pairs": added,
        "pairs_rows": pairs.height,
        "queries": query_table.height,
        "qrels_unknown_query_skipped": unknown_queries,
        "qrels_unknown_document_skipped": unknown_documents,
    }
    files = [path, *documents.files, *([queries] if queries is not None else [])]
    return _ingested(documents_table, query_table, positives, counts, files)


def _positive_ids(
    rows: pl.DataFrame,
    source: Source,
    positive_text: str | None,
    positive_id: str | None,
    keys: pl.DataFrame,
    spool: TableSpool,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """`rows` with `_positive`, the document id of each row's positive; positives given as text that the corpus
    lacks are added to `spool`. Returns the rows, the keys of every document, and how many were added."""
    if positive_text is None:
        return rows.with_columns(_positive=pl.col(positive_id)), keys, 0
    given = _with_hash(
        rows.select(
            "_i", doc_id=pl.col(positive_id) if positive_id else pl.lit(None, pl.String), text=pl.col(positive_text)
        )
    )
    new = (
        given.join(keys.select("text_hash"), on="text_hash", how="anti")
        .with_columns(doc_id=pl.coalesce("doc_id", pl.lit("p-") + pl.col("text_hash").str.slice(0, 16)))
        .unique("doc_id", keep="first", maintain_order=True)
    )
    clash = new.join(keys.select("doc_id"), on="doc_id", how="semi")
    if clash.height:
        raise source.fail(
            int(clash["_i"][0]),
            f"positive_id '{clash['doc_id'][0]}' names a corpus document with a different text",
            "fix the id or the text",
        )
    spool.write(schema.conform(new, schema.CORPUS))
    keys = pl.concat([keys, new.select("doc_id", "text_hash")])
    # A positive given as text is the corpus document with that content.
    by_hash = keys.unique("text_hash", keep="first", maintain_order=True)
    positive = given.join(by_hash, on="text_hash", how="left", suffix="_corpus").sort("_i")["doc_id_corpus"]
    return rows.with_columns(_positive=positive), keys, new.height
