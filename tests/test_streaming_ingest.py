"""Ingest reads a corpus a block at a time and leaves it in a memory-mapped Arrow file: the same tables as a whole
read, the same errors at the same lines wherever the block boundaries fall, and texts that live in the mapped
file, not in the process's own memory."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cranfield_subset, write_beir, write_jsonl

import miner.tables
from miner.errors import InputError
from miner.ingest import ingest

QUERIES = [{"_id": "q1", "text": "swept wing lift"}, {"_id": "q2", "text": "boundary layer"}]
QRELS = [("q1", "d1", 1), ("q2", "d40", 1)]


def _documents(count: int) -> list[dict]:
    # Titles on some documents only, numeric-looking ids on others: what blocks must agree on.
    return [
        {"_id": f"d{i}", "text": f"passage {i} on wings and shocks", **({"title": f"Title {i}"} if i % 3 else {})}
        for i in range(count)
    ]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, so that a 60-line corpus spans many of them."""
    monkeypatch.setattr(miner.tables, "BLOCK_BYTES", 200)
    monkeypatch.setattr(miner.tables, "BLOCK_ROWS", 7)


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed mappings."""
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            regions.append((start, end, fields[5]))
    return regions


def test_blocks_give_the_whole_read_and_the_texts_stay_in_the_mapped_file(
    tmp_path: Path, small_blocks: None, cranfield: Path
) -> None:
    folder = cranfield_subset(tmp_path / "beir", num_queries=5, extra_docs=80)
    whole = ingest(folder)
    spill = tmp_path / "work"
    streamed = ingest(folder, spill=spill)
    assert streamed.corpus.equals(whole.corpus) and streamed.corpus.num_rows > 80
    assert streamed.corpus.column("text").num_chunks > 10  # it really came in blocks
    assert streamed.qrels.equals(whole.qrels) and streamed.counts == whole.counts
    # The spool file is unlinked once mapped, and the folder ingest made is gone again.
    assert not spill.exists()
    texts = streamed.corpus.column("text").chunks[0].buffers()[2]
    owners = [path for start, end, path in _mapped_files() if start <= texts.address < end]
    assert owners and ".spool-" in owners[0] and owners[0].endswith("(deleted)"), owners


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_corpus_table_in_blocks_equals_a_whole_read(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"doc_id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in _documents(60)]
    corpus = tmp_path / f"corpus.{fmt}"
    if fmt == "jsonl":
        write_jsonl(corpus, rows)
    elif fmt == "csv":
        pl.DataFrame(rows).write_csv(corpus)
    else:
        pq.write_table(pa.Table.from_pylist(rows), corpus, row_group_size=9)
    pairs = tmp_path / "pairs.jsonl"
    # One positive is a corpus document's text (title joined), the other is new and joins the corpus.
    known = "Title 2 passage 2 on wings and shocks"
    write_jsonl(pairs, [{"query": "wing lift", "positive": known}, {"query": "new", "positive": "a new passage"}])
    whole = ingest(pairs, corpus=corpus)
    monkeypatch.setattr(miner.tables, "BLOCK_BYTES", 200)
    monkeypatch.setattr(miner.tables, "BLOCK_ROWS", 7)
    streamed = ingest(pairs, corpus=corpus, spill=tmp_path / "work")
    assert streamed.corpus.column("text").num_chunks > 5
    assert streamed.corpus.equals(whole.corpus) and streamed.qrels.equals(whole.qrels)
    assert streamed.counts == whole.counts and streamed.counts["documents_added_from_pairs"] == 1
    assert "d2" in streamed.qrels["doc_id"].to_pylist()


def _beir_with(tmp_path: Path, documents: list[dict], edit=None) -> Path:
    folder = write_beir(tmp_path, documents, QUERIES, QRELS)
    if edit is not None:
        path = folder / "corpus.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        edit(lines)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _refusal(folder: Path) -> str:
    with pytest.raises(InputError) as caught:
        ingest(folder, spill=folder.parent / "work")
    assert not (folder.parent / "work").exists()  # nothing half-written is left
    return str(caught.value)


def _set(line: int, value: str):
    def edit(lines: list[str]) -> None:
        lines[line - 1] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set(47, '{"_id": "d46", "text": broken}'), "corpus.jsonl:47: not valid JSON"),
        (_set(52, '{"_id": "d3", "text": "again"}'), "corpus.jsonl:52: duplicate document id 'd3' (first at line 4)"),
        (_set(38, '{"_id": "", "text": "no id"}'), "corpus.jsonl:38: empty document id"),
        (_set(55, '{"_id": "d54", "text": {"nested": 1}}'), "corpus.jsonl:55: field 'text' must be text"),
    ],
)
def test_a_fault_in_a_late_block_names_its_line(tmp_path: Path, small_blocks: None, edit, expected: str) -> None:
    folder = _beir_with(tmp_path / "beir", _documents(60), edit)
    assert expected in _refusal(folder)


def test_ids_that_are_numbers_in_one_block_and_words_in_another(tmp_path: Path, small_blocks: None) -> None:
    documents = [{"_id": i, "text": f"passage {i}"} for i in range(30)] + _documents(60)[30:]
    folder = write_beir(tmp_path / "beir", documents, QUERIES, [("q1", "3", 1), ("q2", "d40", 1)])
    data = ingest(folder, spill=tmp_path / "work")
    assert data.corpus.column("doc_id").to_pylist()[:3] == ["0", "1", "2"] and data.corpus.num_rows == 60


def test_a_block_without_any_text_field_skips_its_documents(tmp_path: Path, small_blocks: None) -> None:
    documents = _documents(60)
    for document in documents[20:30]:
        del document["text"]
        document.pop("title", None)
    folder = write_beir(tmp_path / "beir", documents, QUERIES, QRELS)
    data = ingest(folder, spill=tmp_path / "work")
    assert data.counts["documents"] == 50 and data.counts["documents_empty_skipped"] == 10


def test_a_line_longer_than_a_block(tmp_path: Path, small_blocks: None) -> None:
    documents = _documents(60)
    documents[10]["text"] = "long " * 500
    folder = write_beir(tmp_path / "beir", documents, QUERIES, QRELS)
    data = ingest(folder, spill=tmp_path / "work")
    texts = dict(zip(data.corpus["doc_id"].to_pylist(), data.corpus["text"].to_pylist(), strict=True))
    assert texts["d10"] == "Title 10 " + ("long " * 500).strip()
    assert json.loads((folder / "corpus.jsonl").read_text().splitlines()[10])["_id"] == "d10"


def test_a_folder_of_corpus_shards_reads_as_one_corpus(tmp_path: Path) -> None:
    rows = [{"doc_id": d["_id"], "title": d.get("title", ""), "text": d["text"]} for d in _documents(60)]
    whole = tmp_path / "corpus.jsonl"
    write_jsonl(whole, rows)
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:25]), shards / "part-0.parquet", row_group_size=10)
    write_jsonl(shards / "part-1.jsonl", rows[25:40])
    pl.DataFrame(rows[40:]).write_csv(shards / "part-2.csv")
    (shards / "README.txt").write_text("not a shard")
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"query": "wing lift", "positive_id": "d1"}, {"query": "shock", "positive_id": "d45"}])
    from_file = ingest(pairs, corpus=whole)
    from_shards = ingest(pairs, corpus=shards, spill=tmp_path / "work")
    assert from_shards.corpus.equals(from_file.corpus) and from_shards.qrels.equals(from_file.qrels)
    assert sorted(Path(p).name for p in from_shards.input_hashes) == [
        "pairs.jsonl",
        "part-0.parquet",
        "part-1.jsonl",
        "part-2.csv",
    ]


def test_an_id_in_two_shards_names_both_places(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", [{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}])
    write_jsonl(shards / "b.jsonl", [{"_id": "d3", "text": "three"}, {"_id": "d2", "text": "again"}])
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"query": "one", "positive_id": "d1"}])
    with pytest.raises(InputError) as caught:
        ingest(pairs, corpus=shards, spill=tmp_path / "work")
    assert str(caught.value).startswith(
        f"{shards / 'b.jsonl'}:2: duplicate document id 'd2' (first at {shards}/a.jsonl line 2)"
    )
    (shards / "a.jsonl").unlink()
    (shards / "b.jsonl").unlink()
    with pytest.raises(InputError, match="a corpus folder holds no file to read"):
        ingest(pairs, corpus=shards)
