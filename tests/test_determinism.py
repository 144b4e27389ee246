"""Same inputs, settings and seed: the same rows in the same order. At float32 also whatever the batch sizes and
threads; at bfloat16 these move scores by its rounding, so only near-ties may change places."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

pytestmark = pytest.mark.usefixtures("prefect_server")

ROW_IDENTITY = ["query_id", "positive_id", "negative_id", "negative_rank", "source", "fallback_step"]
SCORES = ["positive_score", "negative_score"]


def _mine(data: Path, out: Path, *args: str | int) -> Path:
    # No embedding cache: each run encodes for itself, so the batch size really changes the computation.
    code, _, stderr = run_cli(
        "mine", data, "--out", out, "-q", "--no-cache", "--sampling", "random", "--seed", 7, *args
    )
    assert code == 0, stderr
    return out / "negatives.parquet"


def test_batch_sizes_and_threads_change_no_row_and_the_seed_does(tiny_beir: Path, tmp_path: Path) -> None:
    first = pq.read_table(_mine(tiny_beir, tmp_path / "a", "--precision", "float32"))
    again = pq.read_table(_mine(tiny_beir, tmp_path / "b", "--precision", "float32"))
    assert first.equals(again)  # bit for bit when nothing changes

    other = pq.read_table(
        _mine(tiny_beir, tmp_path / "c", "--precision", "float32", "--encode-batch-size", 5, "--threads", 1)
    )
    assert other.select(ROW_IDENTITY).equals(first.select(ROW_IDENTITY))
    # Padding differs with the batch, so the matrix products differ in the last bits of float32 (measured:
    # up to 1.4e-7 in an embedding), never more.
    for column in SCORES:
        np.testing.assert_allclose(other[column].to_numpy(), first[column].to_numpy(), rtol=0, atol=1e-5)

    # And the seed does matter: another one draws other negatives.
    reseeded = pq.read_table(_mine(tiny_beir, tmp_path / "d", "--precision", "float32", "--seed", 8))
    assert reseeded["negative_id"].to_pylist() != first["negative_id"].to_pylist()


def test_bfloat16_gives_the_same_rows_twice(tiny_beir: Path, tmp_path: Path) -> None:
    first_out = tmp_path / "a"
    first = pq.read_table(_mine(tiny_beir, first_out, "--precision", "bfloat16"))
    again = pq.read_table(_mine(tiny_beir, tmp_path / "b", "--precision", "bfloat16"))
    assert first.equals(again)  # bit for bit when nothing changes
    assert json.loads((first_out / "manifest.json").read_text())["models"]["embedding"]["precision"] == "bfloat16"

    # Other batches round differently at bfloat16: scores move by its rounding (measured: ~1e-3), so a near-tie
    # may swap, but the negatives stay nearly all the same.
    other = pq.read_table(
        _mine(tiny_beir, tmp_path / "c", "--precision", "bfloat16", "--encode-batch-size", 5, "--threads", 1)
    )
    kept = set(zip(first["query_id"].to_pylist(), first["negative_id"].to_pylist(), strict=True))
    moved = set(zip(other["query_id"].to_pylist(), other["negative_id"].to_pylist(), strict=True))
    assert len(kept & moved) >= 0.8 * len(kept)


def test_bfloat16_rows_are_the_same_with_a_cache_and_without(
    tiny_beir: Path, tiny_cross_encoder: Path, tmp_path: Path
) -> None:
    # The precision guards encode (score) their sample in batches of their own; a run with a cache takes those
    # from it, a run without encodes the sample again in the same batches: the same rows either way, to the bit.
    # The random teacher fails its guard: its sample is then scored at float32, by the guard and again.
    args = ("--precision", "bfloat16", "--cross-encoder", tiny_cross_encoder)
    without = pq.read_table(_mine(tiny_beir, tmp_path / "a", *args))
    code, _, stderr = run_cli(
        "mine", tiny_beir, "--out", tmp_path / "b", "-q", "--cache-dir", tmp_path / "cache",
        "--sampling", "random", "--seed", 7, *args,
    )  # fmt: skip
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["precision"]["embedding"]["guard"]["passed"]
    assert not manifest["precision"]["teacher"]["guard"]["passed"]
    assert pq.read_table(tmp_path / "b" / "negatives.parquet").equals(without)
