"""Reduced precision: chosen from the CPU's own flags, checked against float32 on the run's texts, never mixed
with another precision's cache entries, and given up for float32 when the check fails."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from random_models import minilm_cross_encoder

from miner.config import load_config
from miner.ingest import ingest
from miner.models import model_key, resolve_model
from miner.pipeline import embedding_precision, teacher_precision
from miner.precision import (
    BF16_UNITS,
    GuardFloor,
    choose_precision,
    cpu_capabilities,
    score_agreement,
    vector_agreement,
)
from miner.score import teacher_pairs

FLOOR = GuardFloor(min_cosine=0.99, min_overlap=0.9, min_rank_correlation=0.98)


def test_auto_follows_the_cpus_bf16_units_and_a_forced_precision_is_kept() -> None:
    import torch

    this_cpu = cpu_capabilities()
    # The CPU's flags as the kernel lists them say what torch's own check says.
    assert {unit: bool(this_cpu[unit]) for unit in BF16_UNITS} == {
        unit: bool(torch.cpu.get_capabilities()[unit]) for unit in BF16_UNITS
    }
    has_units = bool(this_cpu.get("avx512_bf16") or this_cpu.get("amx_bf16"))
    chosen = choose_precision("auto")
    assert chosen.precision == ("bfloat16" if has_units else "float32")
    assert str(this_cpu.get("cpu_name") or "this CPU") in chosen.reason

    # The same rule on the two kinds of machine this project runs on, read from their flags.
    amd_without_units = {**this_cpu, "cpu_name": "AMD EPYC", "avx512_bf16": False, "amx_bf16": False}
    intel_with_amx = {**this_cpu, "cpu_name": "Intel Xeon", "avx512_bf16": True, "amx_bf16": True}
    assert choose_precision("auto", amd_without_units).precision == "float32"
    assert "no bf16 units" in choose_precision("auto", amd_without_units).reason
    assert choose_precision("auto", intel_with_amx).precision == "bfloat16"
    assert "amx_bf16 and avx512_bf16" in choose_precision("auto", intel_with_amx).reason
    assert choose_precision("float32", intel_with_amx).precision == "float32"
    assert choose_precision("bfloat16", amd_without_units).precision == "bfloat16"


def test_agreement_figures_pass_close_vectors_and_fail_a_scrambled_ranking() -> None:
    rng = np.random.default_rng(0)
    queries, documents = rng.normal(size=(8, 16)), rng.normal(size=(40, 16))
    close = vector_agreement(queries + 1e-4, queries, documents + 1e-4, documents, FLOOR)
    assert close["passed"] and close["min_cosine"] > 0.9999 and close["mean_overlap"] == 1.0
    assert close["overlap_depth"] == 20  # half of 40 sampled documents

    # Documents of another set entirely: every vector far from its reference, rankings unrelated.
    far = vector_agreement(queries, queries, rng.normal(size=(40, 16)), documents, FLOOR)
    assert not far["passed"] and "cosine" in far["failed"] and "overlap" in far["failed"]

    scores = rng.normal(size=50)
    assert score_agreement(scores + 1e-4, scores, FLOOR)["passed"]
    shuffled = score_agreement(rng.permutation(scores), scores, FLOOR)
    assert not shuffled["passed"] and "rank correlation" in shuffled["failed"]


def _config(data: Path, tmp_path: Path, **models: object):
    return load_config(
        None,
        {
            "data": data,
            "out": tmp_path / "out",
            "cache_dir": tmp_path / "cache",
            "show_progress": False,
            **{f"models.{key}": value for key, value in models.items()},
        },
    )


def test_the_guard_keeps_bfloat16_when_it_agrees_with_float32(tiny_beir: Path, tmp_path: Path) -> None:
    config = _config(tiny_beir, tmp_path, precision="bfloat16")
    data = ingest(tiny_beir)
    ref, record = embedding_precision(data, resolve_model("all-MiniLM-L6-v2"), config)
    assert ref.precision == "bfloat16" and record["precision"] == "bfloat16"
    guard = record["guard"]
    # Every query of this small set and every document up to the sample's floor of 32.
    assert guard["texts"] == data.queries.num_rows + 32
    assert guard["passed"] and guard["min_cosine"] >= 0.99 and guard["mean_overlap"] >= 0.9
    assert model_key(ref) != model_key(resolve_model("all-MiniLM-L6-v2"))


def test_a_failed_guard_falls_back_to_float32_with_a_warning(
    tiny_beir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No bfloat16 vector is ever exactly the float32 one: a floor of 1.0 cannot be met.
    config = _config(tiny_beir, tmp_path, precision="bfloat16", guard_min_cosine=1.0)
    with caplog.at_level(logging.WARNING, logger="miner.pipeline"):
        ref, record = embedding_precision(ingest(tiny_beir), resolve_model("all-MiniLM-L6-v2"), config)
    assert ref.precision == "float32" and record["precision"] == "float32" and record["requested"] == "bfloat16"
    assert "guard failed" in record["reason"] and not record["guard"]["passed"]
    assert "failed the precision guard" in caplog.text and "running at float32" in caplog.text


def test_the_teacher_guard_keeps_a_spread_teacher_and_refuses_one_bfloat16_cannot_tell_apart(
    small_beir: Path, tiny_cross_encoder: Path, bundled_model_path: Path, tmp_path: Path
) -> None:
    data = ingest(small_beir)
    pairs = teacher_pairs(data.qrels, data.qrels)

    def guarded(teacher: Path) -> tuple[str, dict]:
        config = _config(small_beir, tmp_path, precision="bfloat16", cross_encoder=str(teacher))
        ref, record = teacher_precision(pairs, data, resolve_model(str(teacher)), config)
        assert record["guard"]["pairs"] == min(pairs.num_rows, 32)
        return ref.precision, record

    # MiniLM's pretrained encoder under a new head: scores spread by what the texts say, ranks kept.
    spread = minilm_cross_encoder(tmp_path / "minilm-ce", bundled_model_path)
    precision, record = guarded(spread)
    assert precision == "bfloat16" and record["guard"]["rank_correlation"] >= 0.98
    # A random 2-layer encoder scores every pair within 1e-4 of the others, below bfloat16's resolution: its
    # ranks scramble, and the run must stay at float32.
    precision, record = guarded(tiny_cross_encoder)
    assert precision == "float32" and record["guard"]["rank_correlation"] < 0.98
    assert "guard failed" in record["reason"]


def test_caches_never_mix_precisions_and_a_warm_run_skips_the_guard(tiny_beir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def mine(out: str, precision: str) -> dict:
        args = ("mine", tiny_beir, "--out", tmp_path / out, "--cache-dir", cache, "-q", "--no-bm25")
        code, _, stderr = run_cli(*args, "--precision", precision)
        assert code == 0, stderr
        return json.loads((tmp_path / out / "manifest.json").read_text())

    data = ingest(tiny_beir)
    queries, documents = data.queries.num_rows, data.corpus.num_rows
    first = mine("a", "bfloat16")
    assert first["counts"]["embeddings"]["queries_encoded"] == queries
    assert first["counts"]["embeddings"]["documents_encoded"] == documents
    guard = first["precision"]["embedding"]["guard"]
    assert guard["passed"] and guard["encoded"] == {"queries": queries, "documents": 32}
    # float32 finds none of the bfloat16 vectors: only the float32 vectors the guard computed for its sample
    # (every query of this small set, 32 documents); it encodes everything else again.
    full = mine("b", "float32")
    assert full["counts"]["embeddings"]["queries_encoded"] == 0
    assert full["counts"]["embeddings"]["documents_encoded"] == documents - 32
    assert full["precision"]["embedding"] == {**full["precision"]["embedding"], "precision": "float32", "guard": None}
    # bfloat16 again: everything cached at its precision, so nothing to encode and nothing to check.
    warm = mine("c", "bfloat16")
    assert warm["counts"]["embeddings"]["queries_encoded"] == 0
    assert warm["precision"]["embedding"]["guard"].startswith("not run")

    code, info, _ = run_cli("cache", "info", "--cache-dir", cache)
    assert code == 0
    lines = [line for line in info.splitlines() if "queries" in line]
    assert len(lines) == 2 and any("bfloat16" in line for line in lines) and any("float32" in line for line in lines)
