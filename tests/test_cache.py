from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from miner.cache import EmbeddingCache, TeacherScoreCache
from miner.cli import app
from miner.config import MineConfig, load_config
from miner.ingest import Ingested, ingest
from miner.models import ModelHandle, embed_table
from miner.pipeline import bm25_candidates
from miner.score import cross_encoder_scores, teacher_pairs


def _store(cache: EmbeddingCache, hashes: list[str], vectors: np.ndarray, kind: str = "document") -> None:
    cache.store("m", kind, hashes, vectors, np.zeros(len(hashes), dtype=bool))


def test_round_trip_and_partial_hits(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    assert cache.lookup("m", "document", ["a"])[0] is None  # nothing cached: not even the dimension is known
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    cache.store("m", "document", ["a", "b", "c"], vectors, np.array([False, True, False]))
    got, found, truncated = cache.lookup("m", "document", ["c", "x", "a", "b"])
    assert found.tolist() == [True, False, True, True]
    assert truncated.tolist() == [False, False, False, True]
    assert np.array_equal(got[0], vectors[2]) and np.array_equal(got[2], vectors[0])
    assert not cache.lookup("m", "query", ["a"])[1].any()  # queries and documents are kept apart
    assert not cache.lookup("other-model", "document", ["a"])[1].any()
    assert not list(tmp_path.rglob("*.tmp"))
    twice, found, _ = cache.lookup("m", "document", ["b", "b"])
    assert found.all() and np.array_equal(twice[0], twice[1])


def test_a_corrupt_shard_is_discarded_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path)
    _store(cache, ["a"], np.ones((1, 4), dtype=np.float32))
    (shard,) = list(tmp_path.rglob("shard-*.npz"))
    data = bytearray(shard.read_bytes())
    data[-40:-30] = b"\x00" * 10
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        _, found, _ = cache.lookup("m", "document", ["a"])
    assert not found.any()
    assert not shard.exists()
    assert "discarding" in caplog.text


def _table(texts: list[str]) -> pa.Table:
    return pa.table(
        {"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts, "text_hash": [f"h-{t}" for t in texts]}
    )


def test_embed_table_encodes_each_new_text_once(tmp_path: Path, embedding_model) -> None:
    cache = EmbeddingCache(tmp_path)
    table = _table(["wing lift", "shock wave", "wing lift", "boundary layer"])
    options = {"id_column": "doc_id", "kind": "document", "batch_size": 8, "show_progress": False}
    plain = embed_table(embedding_model, table, **options)
    first = embed_table(embedding_model, table, cache=cache, model_key="k", **options)
    assert first.encoded == 3  # the repeated text is encoded once
    assert np.allclose(first.vectors, plain.vectors, atol=1e-6)
    grown = _table(["wing lift", "shock wave", "wing lift", "boundary layer", "nozzle flow"])
    second = embed_table(embedding_model, grown, cache=cache, model_key="k", **options)
    assert second.encoded == 1
    assert np.allclose(second.vectors[:4], plain.vectors, atol=1e-6)
    # All cached: the model is never loaded.
    handle = ModelHandle(lambda: embedding_model)
    third = embed_table(handle, grown, cache=cache, model_key="k", **options)
    assert third.encoded == 0 and not handle.loaded
    assert np.array_equal(third.vectors, second.vectors)


@pytest.mark.usefixtures("prefect_server")
def test_a_rerun_with_other_filter_settings_encodes_nothing(small_beir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    first = runner.invoke(app, ["mine", str(small_beir), "--out", str(tmp_path / "a"), "-q", *cache])
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        app, ["mine", str(small_beir), "--out", str(tmp_path / "b"), "-q", "--expansion-depth", "10", *cache]
    )
    assert second.exit_code == 0, second.output
    before = json.loads((tmp_path / "a" / "manifest.json").read_text())["counts"]["embeddings"]
    after = json.loads((tmp_path / "b" / "manifest.json").read_text())["counts"]["embeddings"]
    assert before["documents_encoded"] > 0 and before["queries_encoded"] > 0
    assert after["documents_encoded"] == 0 and after["queries_encoded"] == 0
    bm25 = [json.loads((tmp_path / n / "manifest.json").read_text())["counts"]["bm25_index"] for n in "ab"]
    assert bm25[0]["documents_indexed"] > 0 and bm25[1]["documents_indexed"] == 0

    # A third setting, in a process of its own: BM25's hits and the vectors all come from the cache, so the
    # process never starts the JVM nor imports torch, the two costs of a cold start.
    probe = (
        "import sys; from miner.cli import app; from typer.testing import CliRunner; "
        f"result = CliRunner().invoke(app, ['mine', {str(small_beir)!r}, '--out', {str(tmp_path / 'c')!r}, '-q', "
        f"'--expansion-depth', '20', '--cache-dir', {str(tmp_path / 'cache')!r}]); "
        "print(result.exit_code, 'jnius' in sys.modules, 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    warm = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=600)
    assert warm.stdout.split() == ["0", "False", "False"], warm.stderr
    pools = [json.loads((tmp_path / n / "manifest.json").read_text())["counts"]["candidates"] for n in "ac"]
    assert pools[0] == pools[1]  # the same candidates, from the kept hits


def test_cache_info_and_clear(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    _store(cache, ["a", "b"], np.ones((2, 3), dtype=np.float32))
    info = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(tmp_path)])
    assert info.exit_code == 0 and "embeddings/m-document" in info.stdout and "2 vectors" in info.stdout
    assert "1 entry," in info.stdout
    cleared = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 0
    assert not cache.lookup("m", "document", ["a"])[1].any()


def _info_rows(root: Path) -> dict[str, list[str]]:
    """`miner cache info`'s rows by entry path (the last column), each cut into its columns."""
    info = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(root)])
    assert info.exit_code == 0, info.output
    lines = info.stdout.splitlines()[1:-1]
    header = lines[0]
    starts = [header.index(name) for name in ("kind", "model", "precision", "texts", "rows", "size", "created")]
    starts += [header.index("last used"), header.index("entry")]
    rows = {}
    for line in lines[1:]:
        cells = [line[start:end].strip() for start, end in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[-1]] = cells
    return rows


def test_cache_info_names_model_texts_and_times_and_clear_older_than_keeps_what_was_used(tmp_path: Path) -> None:
    import datetime as dt
    import os

    EmbeddingCache(tmp_path, {"m": "all-MiniLM-L6-v2"}).store("m", "query", ["a"], np.ones((1, 3)), np.zeros(1))
    EmbeddingCache(tmp_path, {"old": "my/old-model"}).store("old", "document", ["b"], np.ones((1, 3)), np.zeros(1))
    scores = pl.DataFrame({"query_hash": ["q"], "passage_hash": ["p"], "teacher_score": [0.5]})
    TeacherScoreCache(tmp_path, {"t": "my/reranker"}).store("t", scores)
    rows = _info_rows(tmp_path)
    assert rows["embeddings/m-query"][:5] == ["embeddings", "all-MiniLM-L6-v2", "float32", "queries", "1 vectors"]
    assert rows["embeddings/old-document"][1:4] == ["my/old-model", "float32", "documents"]
    assert rows["teacher/t"][:5] == ["teacher scores", "my/reranker", "float32", "(query, passage) pairs", "1 scores"]
    today = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}"
    assert all(row[6].startswith(today) and row[7].startswith(today) for row in rows.values())

    # The old model's vectors were last used 40 days ago; a lookup of the others counts as a use today.
    forty_days_ago = (dt.datetime.now() - dt.timedelta(days=40)).timestamp()
    for path in (tmp_path / "embeddings").rglob("*"):
        if "old-document" in str(path):
            os.utime(path, (forty_days_ago, forty_days_ago))
    old_record = tmp_path / "embeddings" / "old-document.entry.json"
    os.utime(old_record, (forty_days_ago, forty_days_ago))
    assert EmbeddingCache(tmp_path).lookup("m", "query", ["a"])[1].all()
    assert _info_rows(tmp_path)["embeddings/old-document"][7] < today

    cleared = CliRunner().invoke(app, ["cache", "clear", "--older-than", "30d", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 0, cleared.output
    assert cleared.stdout.startswith("removed 1 entry not used for 30d")
    assert set(_info_rows(tmp_path)) == {"embeddings/m-query", "teacher/t"}
    assert not old_record.exists() and not (tmp_path / "embeddings" / "old-document").exists()


def test_cache_clear_refuses_an_age_it_cannot_read(tmp_path: Path) -> None:
    EmbeddingCache(tmp_path).store("m", "query", ["a"], np.ones((1, 3)), np.zeros(1))
    cleared = CliRunner().invoke(app, ["cache", "clear", "--older-than", "30 days", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 2
    assert cleared.stderr.strip() == (
        "error: --older-than: '30 days' is not an age; give a number and a unit: 30d, 12h, 2w, 90m or 45s"
    )
    assert EmbeddingCache(tmp_path).lookup("m", "query", ["a"])[1].all()  # nothing removed


def _bm25_config(data: Path, tmp_path: Path, cache: bool = True) -> MineConfig:
    return load_config(None, {"data": data, "out": tmp_path / "out", "cache_dir": tmp_path / "cache", "cache": cache})


def test_bm25_index_is_cached_grown_by_new_documents_and_rebuilt_when_damaged(
    small_beir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = ingest(small_beir)
    new_ids = full.corpus["doc_id"].to_pylist()[-10:]
    older = Ingested(
        **{**vars(full), "corpus": full.corpus.filter(pc.invert(pc.is_in(full.corpus["doc_id"], pa.array(new_ids))))}
    )
    config = _bm25_config(small_beir, tmp_path)
    _, first = bm25_candidates(older, config)
    assert first["analyzer"] == "io.anserini.analysis.DefaultEnglishAnalyzer"  # the rest: tests/test_languages.py
    indexed = ("documents_indexed", "documents_from_cache")
    assert [first[key] for key in indexed] == [older.corpus.num_rows, 0]
    grown, counts = bm25_candidates(full, config)
    assert [counts[key] for key in indexed] == [10, full.corpus.num_rows - 10]
    fresh, _ = bm25_candidates(full, _bm25_config(small_beir, tmp_path / "nocache", cache=False))
    assert grown.equals(fresh)  # the grown index ranks exactly as one built from scratch
    again, counts = bm25_candidates(full, config)
    assert counts["documents_indexed"] == 0 and again.equals(fresh)
    # The search's hits were kept beside their index; a damaged file of them is searched again and replaced.
    kept = sorted((tmp_path / "cache" / "bm25").glob("*.hits-*.parquet"))
    assert len(kept) == 2  # the smaller corpus's search, and the whole one's
    for hits_file in kept:
        hits_file.write_bytes(hits_file.read_bytes()[:100])
    searched_again, _ = bm25_candidates(full, config)
    assert searched_again.equals(fresh) and any(pq.read_table(f).equals(fresh) for f in kept if f.stat().st_size > 100)
    # Damage a file of the cached index: detected by its checksum, rebuilt, never used.
    entry = max((p for p in (tmp_path / "cache" / "bm25").iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    victim = max((p for p in entry.iterdir() if p.suffix not in (".json", ".parquet")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING):
        rebuilt, counts = bm25_candidates(full, config)
    assert "failed its checksum" in caplog.text
    assert counts["documents_indexed"] > 0 and rebuilt.equals(fresh)


def test_teacher_scores_are_cached_by_text(small_beir: Path, tiny_cross_encoder: Path, tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    data = ingest(small_beir)
    pairs = teacher_pairs(data.qrels, data.qrels).slice(0, 30)
    cache = TeacherScoreCache(tmp_path)
    model = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    options = {"batch_size": 8, "show_progress": False, "cache": cache, "model_key": "t"}
    first = cross_encoder_scores(pairs, data.queries, data.corpus, model, **options)
    handle = ModelHandle(lambda: model)
    second = cross_encoder_scores(pairs, data.queries, data.corpus, handle, **options)
    assert not handle.loaded and second.equals(first)
    more = teacher_pairs(data.qrels, data.qrels).slice(0, 40)
    grown = cross_encoder_scores(more, data.queries, data.corpus, handle, **options)
    assert handle.loaded and grown.num_rows == 40
    plain = cross_encoder_scores(more, data.queries, data.corpus, model, batch_size=8, show_progress=False)
    assert np.allclose(grown["teacher_score"].to_numpy(), plain["teacher_score"].to_numpy(), atol=1e-5)
