"""Property-based: readers fed generated malformed files end in a one-line InputError or in exactly the rows
the file holds, never in a traceback or a silently wrong row."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_beir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import miner.tables
from miner.errors import InputError
from miner.ingest import ingest

DOCS = [
    {"_id": "d1", "title": "Wings", "text": "lift on a swept wing"},
    {"_id": "d2", "title": "", "text": "boundary layer transition"},
    {"_id": "d3", "title": "Shock", "text": "shock waves in nozzles"},
    {"_id": "d4", "text": "heat transfer at hypersonic speed"},
]
QUERIES = [{"_id": "q1", "text": "swept wing lift"}, {"_id": "q2", "text": "boundary layer"}]
QRELS = [("q1", "d1", 2), ("q2", "d2", 1), ("q2", "d4", 1)]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that matter to the formats: structure, quoting, separators, line ends, invalid UTF-8, a BOM.
SPECIAL = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\t", b"\n", b"\r\n", b"\\", b"\xff", b"\xc3", b"\xef\xbb\xbf"]
insertion = st.one_of(st.sampled_from(SPECIAL), st.binary(min_size=1, max_size=6))


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with one to three edits: insert, delete, duplicate a line, or truncate."""
    data = original
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "delete", "duplicate_line", "truncate"]))
        if edit == "insert":
            data = data[:position] + draw(insertion) + data[position:]
        elif edit == "delete":
            data = data[:position] + data[position + draw(st.integers(1, 8)) :]
        elif edit == "duplicate_line":
            lines = data.split(b"\n")
            index = draw(st.integers(0, len(lines) - 1))
            lines.insert(index, lines[index])
            data = b"\n".join(lines)
        else:
            data = data[:position]
    return data


def _ingest_or_refuse(folder: Path, spill: Path | None = None) -> object:
    """The reader's answer: an Ingested, or the InputError, which must be one line naming a file."""
    try:
        return ingest(folder, spill=spill)
    except InputError as error:
        message = str(error)
        assert "\n" not in message and str(folder) in message, message
        return error


def _expected_corpus(raw: bytes) -> dict[str, str] | None:
    """What a correct reader makes of corpus bytes, by Python's own JSON; None if some line is not valid."""
    try:
        lines = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    documents = {}
    for line in lines:
        if not isinstance(line, dict) or not isinstance(line.get("_id"), str):
            return None
        if not isinstance(line.get("text", ""), str) or not isinstance(line.get("title", ""), str):
            return None
        title, body = (line.get("title") or "").strip(), (line.get("text") or "").strip()
        text = body if not title or body.startswith(title) else f"{title} {body}"
        if text.strip():
            documents[line["_id"]] = text
    return documents


def _check_mutated_corpus(data: st.DataObject, spill: bool) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        folder = write_beir(Path(workdir), DOCS, QUERIES, QRELS)
        raw = data.draw(mutated((folder / "corpus.jsonl").read_bytes()))
        (folder / "corpus.jsonl").write_bytes(raw)
        result = _ingest_or_refuse(folder, spill=Path(workdir) / "work" if spill else None)
        if isinstance(result, InputError):
            return
        expected = _expected_corpus(raw)
        assert expected is not None, f"accepted a corpus Python's JSON rejects: {raw!r}"
        got = dict(zip(result.corpus["doc_id"].to_pylist(), result.corpus["text"].to_pylist(), strict=True))
        assert got == expected


@FUZZ
@given(st.data())
def test_mutated_corpus_jsonl(data: st.DataObject) -> None:
    _check_mutated_corpus(data, spill=False)


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_mutated_corpus_jsonl_read_in_blocks_of_a_line_or_two(data: st.DataObject) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(miner.tables, "BLOCK_BYTES", 64)
        _check_mutated_corpus(data, spill=True)


@FUZZ
@given(st.data())
def test_mutated_qrels_tsv(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        folder = write_beir(Path(workdir), DOCS, QUERIES, QRELS)
        path = folder / "qrels" / "test.tsv"
        raw = data.draw(mutated(path.read_bytes()))
        path.write_bytes(raw)
        result = _ingest_or_refuse(folder)
        if isinstance(result, InputError):
            return
        # Every positive read must be a row of the file with a grade of at least 1.
        rows = {tuple(line.split("\t")) for line in raw.decode("utf-8").splitlines()[1:]}
        pairs = zip(result.qrels["query_id"].to_pylist(), result.qrels["doc_id"].to_pylist(), strict=True)
        for query_id, doc_id in pairs:
            grades = [int(g) for q, d, g in (r for r in rows if len(r) == 3) if q == query_id and d == doc_id]
            assert grades and max(grades) >= 1, (query_id, doc_id, raw)


def _pairs_parquet() -> bytes:
    table = pa.table({"query": ["swept wing lift", "boundary layer"], "positive": ["lift on a wing", "transition"]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


@FUZZ
@given(st.data())
def test_mutated_parquet_pairs(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "pairs.parquet"
        path.write_bytes(data.draw(mutated(_pairs_parquet())))
        _ingest_or_refuse(path)  # any exception other than InputError fails the test


@FUZZ
@given(st.data())
def test_mutated_pairs_csv(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "pairs.csv"
        original = b'query,positive\nswept wing lift,"lift on a swept wing"\nboundary layer,transition\n'
        raw = data.draw(mutated(original))
        path.write_bytes(raw)
        result = _ingest_or_refuse(path)
        if isinstance(result, InputError):
            return
        # Each query read is a query of the file: no text made of pieces of two rows.
        text = raw.decode("utf-8")
        for query in result.queries["text"].to_pylist():
            assert query in text, (query, raw)
