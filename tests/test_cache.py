from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from miner.cache import EmbeddingCache
from miner.cli import app
from miner.models import embed_table


def test_round_trip_and_partial_hits(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    cache.store("m", "document", ["a", "b", "c"], vectors)
    got, found = cache.lookup("m", "document", ["c", "x", "a"], dim=2)
    assert found.tolist() == [True, False, True]
    assert np.array_equal(got[0], vectors[2]) and np.array_equal(got[2], vectors[0])
    assert not cache.lookup("m", "query", ["a"], dim=2)[1].any()  # queries and documents are kept apart
    assert not cache.lookup("other-model", "document", ["a"], dim=2)[1].any()
    assert not list(tmp_path.rglob("*.tmp"))
    twice, found = cache.lookup("m", "document", ["b", "b"], dim=2)
    assert found.all() and np.array_equal(twice[0], twice[1])


def test_a_corrupt_shard_is_discarded_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.store("m", "document", ["a"], np.ones((1, 4), dtype=np.float32))
    (shard,) = list(tmp_path.rglob("shard-*.npz"))
    data = bytearray(shard.read_bytes())
    data[-40:-30] = b"\x00" * 10
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        _, found = cache.lookup("m", "document", ["a"], dim=4)
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


def test_cache_info_and_clear(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    cache.store("m", "document", ["a", "b"], np.ones((2, 3), dtype=np.float32))
    info = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(tmp_path)])
    assert info.exit_code == 0 and "m-document" in info.stdout and "2 vectors" in info.stdout
    cleared = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 0
    assert not cache.lookup("m", "document", ["a"], dim=3)[1].any()
