from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_beir, write_jsonl

from miner import schema
from miner.errors import InputError
from miner.ingest import ingest

DOCS = [
    {"_id": "d1", "title": "Wings", "text": "lift on a swept wing"},
    {"_id": "d2", "title": "", "text": "boundary layer   transition"},
    {"_id": "d3", "title": "Shock", "text": "Shock waves in nozzles"},
]
QUERIES = [{"_id": "q1", "text": "swept wing lift"}, {"_id": "q2", "text": "boundary layer"}]
QRELS = [("q1", "d1", 2), ("q2", "d2", 1), ("q2", "d3", 0)]


def test_cranfield_is_read_whole(cranfield: Path) -> None:
    data = ingest(cranfield)
    assert data.counts["documents"] == 1398
    assert data.counts["documents_empty_skipped"] == 2  # ids 471 and 995 have neither title nor text
    assert data.counts["queries_with_positives"] == 225
    assert data.counts["qrels_empty_document_skipped"] == 1
    assert data.counts["positives"] == 1611
    assert data.corpus.schema == schema.CORPUS and data.qrels.schema == schema.QRELS
    assert len(data.input_hashes) == 3


def test_beir_documents_join_title_and_text_and_hash_normalised_text(tmp_path: Path) -> None:
    data = ingest(write_beir(tmp_path, DOCS, QUERIES, QRELS))
    texts = dict(zip(data.corpus["doc_id"].to_pylist(), data.corpus["text"].to_pylist(), strict=True))
    assert texts["d1"] == "Wings lift on a swept wing"
    assert texts["d3"] == "Shock waves in nozzles"  # text already starts with the title
    # Judgement 0 is not a positive; q2 keeps only d2.
    assert sorted(zip(data.qrels["query_id"].to_pylist(), data.qrels["doc_id"].to_pylist(), strict=True)) == [
        ("q1", "d1"),
        ("q2", "d2"),
    ]
    respaced = ingest(
        write_beir(tmp_path / "b", [{**DOCS[1], "text": "boundary layer transition "}], QUERIES[1:], [("q2", "d2", 1)])
    )
    assert respaced.corpus["text_hash"][0] == data.corpus["text_hash"][1]


def test_numeric_ids_are_read_as_text(tmp_path: Path) -> None:
    folder = write_beir(
        tmp_path,
        [{"_id": 7, "text": "a passage"}, {"_id": "x8", "text": "another"}],
        [{"_id": 1, "text": "a query"}],
        [("1", "7", 1)],
    )
    data = ingest(folder)
    assert data.corpus["doc_id"].to_pylist() == ["7", "x8"]
    assert data.qrels["query_id"].to_pylist() == ["1"]


def test_pairs_table_by_text_builds_corpus_and_several_positives(tmp_path: Path) -> None:
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"anchor": "what lifts a wing", "positive": "lift on a swept wing"},
            {"anchor": "what lifts a wing", "positive": "circulation creates lift"},
            {"anchor": "shock", "positive": "Shock waves in nozzles"},
        ],
    )
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"doc_id": "c1", "text": "lift on a  swept wing"}, {"doc_id": "c2", "text": "unrelated passage"}],
    )
    data = ingest(pairs, corpus=corpus)
    assert data.counts["documents"] == 4 and data.counts["documents_added_from_pairs"] == 2
    assert data.counts["queries_with_positives"] == 2 and data.counts["positives"] == 3
    positives = pl.from_arrow(data.qrels)
    # A positive given as text that is already in the corpus is that corpus document.
    assert "c1" in positives["doc_id"].to_list()
    assert positives.group_by("query_id").len()["len"].sort().to_list() == [1, 2]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_pairs_table_by_id(tmp_path: Path, fmt: str) -> None:
    rows = {"query_id": ["q1", "q2"], "positive_id": ["d1", "d2"]}
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "csv":
        pl.DataFrame(rows).write_csv(path)
    else:
        pq.write_table(pa.table(rows), path)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    data = ingest(path, corpus=corpus, queries=queries)
    assert data.counts["positives"] == 2 and data.counts["documents"] == 3


# --- bad input: one clear error naming the place ----------------------------------------------------


def _error(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    folder = write_beir(tmp_path, DOCS, QUERIES, QRELS)
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-1]  # drop the closing brace
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    message = _error(lambda: ingest(folder))
    assert message.startswith(f"{folder / 'corpus.jsonl'}:2: not valid JSON")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    folder = write_beir(tmp_path, DOCS, QUERIES, QRELS)
    with (folder / "queries.jsonl").open("ab") as handle:
        handle.write(b'{"_id": "q3", "text": "caf\xe9"}\n')
    assert "queries.jsonl:3: not valid UTF-8" in _error(lambda: ingest(folder))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d, q, r: ([{"_id": x["_id"], "body": x["text"]} for x in d], q, r),
            "corpus.jsonl: missing column 'text'",
        ),
        (lambda d, q, r: ([*d, {"_id": "", "text": "x"}], q, r), "corpus.jsonl:4: empty document id"),
        (
            lambda d, q, r: ([*d, {"_id": "d2", "text": "x"}], q, r),
            "corpus.jsonl:4: duplicate document id 'd2' (first at line 2)",
        ),
        (lambda d, q, r: (d, [*q, {"_id": "q3", "text": "  "}], r), "queries.jsonl:3: query 'q3' has no text"),
        (lambda d, q, r: (d, q, [*r, ("q9", "d1", 1)]), "test.tsv:5: unknown query id 'q9'"),
        (lambda d, q, r: (d, q, [*r, ("q1", "d9", 1)]), "test.tsv:5: unknown document id 'd9'"),
        (lambda d, q, r: (d, q, [*r, ("q1", "d2", "high")]), "test.tsv:5: score 'high' is not a whole number"),
        (lambda d, q, r: ([{"_id": "d1", "text": ""}], q, [("q1", "d1", 1)]), "the corpus has no document"),
        (lambda d, q, r: (d, q, [("q1", "d1", 0)]), "no judgement with score >= 1"),
        (lambda d, q, r: ([*d, {"_id": "d4", "text": ["a", "list"]}], q, r), "field 'text' must be text"),
    ],
    ids=[
        "missing-column",
        "empty-id",
        "duplicate-id",
        "empty-query",
        "unknown-query",
        "unknown-document",
        "bad-score",
        "empty-corpus",
        "no-positive",
        "nested-value",
    ],
)
def test_bad_beir_input_is_refused_with_its_place(tmp_path: Path, change, expected: str) -> None:
    folder = write_beir(tmp_path, *change(DOCS, QUERIES, QRELS))
    assert expected in _error(lambda: ingest(folder))


def test_unknown_qrels_ids_can_be_skipped_and_counted(tmp_path: Path) -> None:
    folder = write_beir(tmp_path, DOCS, QUERIES, [*QRELS, ("q9", "d1", 1), ("q1", "d9", 1)])
    data = ingest(folder, skip_unknown=True)
    assert data.counts["qrels_unknown_query_skipped"] == 1
    assert data.counts["qrels_unknown_document_skipped"] == 1
    assert data.counts["positives"] == 2


def test_split_choice(tmp_path: Path) -> None:
    folder = write_beir(tmp_path, DOCS, QUERIES, QRELS, split="dev")
    write_beir(tmp_path, DOCS, QUERIES, QRELS[:1], split="test")
    assert "several splits" in _error(lambda: ingest(folder))
    assert ingest(folder, split="test").counts["positives"] == 1
    assert "no such split (available: dev, test)" in _error(lambda: ingest(folder, split="train"))


def test_malformed_csv_pairs_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('query,positive\n"a","b"\n"c","d","e"\n')
    assert f"{path}:3: expected 2 fields, found 3" in _error(lambda: ingest(path))


def test_pairs_errors(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"query": "a", "positive": "b"}, {"query": "c", "positive": ""}])
    assert "p.jsonl:2: empty 'positive'" in _error(lambda: ingest(pairs))
    by_id = write_jsonl(tmp_path / "ids.jsonl", [{"query": "a", "positive_id": "d1"}])
    assert "pairs name positives by id only" in _error(lambda: ingest(by_id))
    nothing = write_jsonl(tmp_path / "n.jsonl", [{"question": "a", "answer": "b"}])
    assert "no query column (looked for query, anchor, query_id; columns found: question, answer)" in _error(
        lambda: ingest(nothing)
    )
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    assert "not a readable Parquet file" in _error(lambda: ingest(corrupt))
    json_array = tmp_path / "array.jsonl"
    json_array.write_text(json.dumps([{"query": "a", "positive": "b"}]) + "\n")
    assert "array.jsonl:1: each line must be a JSON object" in _error(lambda: ingest(json_array))


def test_a_missing_column_lists_the_columns_the_file_has(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), pairs)
    assert "columns found: question, answer" in _error(lambda: ingest(pairs))  # not only those it looked for
    ok_pairs = write_jsonl(tmp_path / "ok.jsonl", [{"query": "a", "positive": "b"}])
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"doc": ["d1"], "text": ["b"]}), corpus)
    message = _error(lambda: ingest(ok_pairs, corpus=corpus))
    assert "needs an id column (_id, doc_id, id) and 'text' (columns found: doc, text)" in message
