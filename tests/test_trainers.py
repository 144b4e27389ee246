"""Every export handed to the trainer that reads it: a few real optimisation steps on a real mining run's files.

sentence-transformers (bi-encoder and cross-encoder) and FlagEmbedding train on the files here. Tevatron has no
usable release on PyPI (0.1.0, 2022: its JSON path expects pre-tokenised ids and its dataset calls tokenizer
methods transformers 5 removed), so tevatron.jsonl is read with `datasets` and held to the fields and types
Tevatron's training dataset reads.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from conftest import refused, run_cli
from datasets import Dataset, load_dataset

from miner import formats
from miner.config import ALL_FORMATS, DEFAULT_FORMATS, EXPORT_FORMATS, load_config

pytestmark = pytest.mark.usefixtures("prefect_server")

NUM_NEGATIVES = 3
MAX_STEPS = 2
BATCH_SIZE = 4
# Tokens per text: a few real steps, not full-length passages.
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def mined(tiny_beir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trainers") / "out"
    code, _, stderr = run_cli(
        "mine", tiny_beir, "--out", out, "--quiet", "--num-negatives", str(NUM_NEGATIVES), "--format", "all"
    )
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def negatives(mined: Path) -> pl.DataFrame:
    return pl.read_parquet(mined / "negatives.parquet")


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    # `datasets` caches what it loads; keep that out of the user's home.
    return str(tmp_path_factory.mktemp("datasets-cache"))


def _parquet(path: Path, cache: str) -> Dataset:
    return load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache)


def _jsonl(path: Path, cache: str) -> Dataset:
    return load_dataset("json", data_files=str(path), split="train", cache_dir=cache)


def _file_rows(path: Path) -> int:
    if path.suffix == ".jsonl":
        return len(path.read_text(encoding="utf-8").split("\n")) - 1  # newline-terminated lines
    return pq.read_metadata(path).num_rows


def _pairs(negatives: pl.DataFrame) -> pl.DataFrame:
    return negatives.unique(["query_id", "positive_id"], maintain_order=True)


# --- files and manifest ------------------------------------------------------------------------------------


def test_manifest_lists_exactly_the_files_written(mined: Path) -> None:
    manifest = json.loads((mined / "manifest.json").read_text())
    written = sorted(path.name for path in mined.iterdir())
    # `all` is every format but the batched ones, which need a batch size (tests/test_batches.py).
    files = [formats.FILES[name] for name in ALL_FORMATS]
    twins = [formats.DATASET_TWINS[name] for name in files if name in formats.DATASET_TWINS]
    assert twins, "the JSONL formats' Parquet copies (for `load_dataset(OUT, name)`) are written"
    assert written == sorted(manifest["files"]) == sorted([*files, *twins, "README.md", "manifest.json"])
    exported = manifest["counts"]["export"]
    for name in files:
        assert exported[name] == _file_rows(mined / name) > 0, name
    assert manifest["config"]["formats"] == list(ALL_FORMATS)


def test_rerun_with_fewer_formats_leaves_only_its_files(mined: Path, tiny_beir: Path, tmp_path: Path) -> None:
    """A folder re-mined with fewer formats loses the files it no longer gets, so no stale export sits unlisted."""
    out = tmp_path / "out"
    shutil.copytree(mined, out)
    code, _, stderr = run_cli(
        "mine", tiny_beir, "--out", out, "--quiet", "--num-negatives", str(NUM_NEGATIVES), "--format", "margin-mse"
    )
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    expected = ["README.md", "manifest.json", "margin-mse.parquet", "negatives.parquet"]
    assert sorted(path.name for path in out.iterdir()) == sorted(manifest["files"]) == expected
    assert set(manifest["counts"]["export"]) == {"negatives.parquet", "margin-mse.parquet"}


def test_unknown_format_is_one_line_and_writes_nothing(tiny_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("mine", tiny_beir, "--out", out, "--format", "triplets,nonsense")
    refused(args, "error: --format: unknown format 'nonsense'", out)


@pytest.mark.parametrize(
    ("given", "chosen"),
    [
        (None, list(DEFAULT_FORMATS)),
        (["tevatron,triplets", "margin-mse"], ["negatives", "triplets", "tevatron", "margin-mse"]),
        ("all", list(ALL_FORMATS)),
        ("batched,ntuples", ["negatives", "ntuples", "batched-triplets", "batched-ntuples"]),
        ([], ["negatives"]),
    ],
)
def test_formats_setting(given: Any, chosen: list[str], tmp_path: Path) -> None:
    size = 4 if "batched-triplets" in chosen else None  # batched formats need a batch size
    config = load_config(None, {"data": tmp_path, "out": tmp_path / "out", "formats": given, "batches.size": size})
    assert config.formats == chosen


def test_every_format_has_a_file() -> None:
    assert list(formats.FILES) == list(EXPORT_FORMATS)


# --- contents against negatives.parquet --------------------------------------------------------------------


def test_labeled_pairs_hold_each_positive_and_negative_once(mined: Path, negatives: pl.DataFrame) -> None:
    pairs = pl.read_parquet(mined / "labeled-pairs.parquet")
    assert pairs.columns == ["query", "passage", "label"]
    positives = negatives.unique(["query_id", "positive_id"]).select("query", passage="positive")
    negatives_once = negatives.unique(["query_id", "negative_id"]).select("query", passage="negative")
    # The same negative was sampled for several positives of a query, so "once" is doing work here.
    assert negatives_once.height < negatives.height
    for label, expected in ((1.0, positives), (0.0, negatives_once)):
        found = pairs.filter(pl.col("label") == label).select("query", "passage")
        assert sorted(found.rows()) == sorted(expected.rows()), label
    assert pairs.height == positives.height + negatives_once.height


def test_margin_mse_label_is_the_teacher_margin(mined: Path, negatives: pl.DataFrame) -> None:
    margins = pl.read_parquet(mined / "margin-mse.parquet")
    assert margins.columns == ["anchor", "positive", "negative", "label"]
    assert (
        margins.select("anchor", "positive", "negative").rows()
        == negatives.select("query", "positive", "negative").rows()
    )
    expected = (negatives["positive_score"] - negatives["negative_score"]).to_list()
    assert margins["label"].to_list() == pytest.approx(expected, abs=1e-6)


def test_flagembedding_lines_per_pair_with_teacher_scores(mined: Path, negatives: pl.DataFrame) -> None:
    lines = [json.loads(line) for line in (mined / "flagembedding.jsonl").read_text().splitlines()]
    pairs = _pairs(negatives)
    assert len(lines) == pairs.height
    for line, (query_id, positive_id) in zip(lines, pairs.select("query_id", "positive_id").rows(), strict=True):
        assert set(line) == {"query", "pos", "neg", "pos_scores", "neg_scores"}
        rows = negatives.filter((pl.col("query_id") == query_id) & (pl.col("positive_id") == positive_id))
        assert line["query"] == rows["query"][0]
        assert line["pos"] == [rows["positive"][0]]
        assert line["neg"] == rows["negative"].to_list()
        assert line["pos_scores"] == pytest.approx([rows["positive_score"][0]], abs=1e-6)
        assert line["neg_scores"] == pytest.approx(rows["negative_score"].to_list(), abs=1e-6)


def test_tevatron_lines_have_the_fields_tevatron_reads(
    mined: Path, negatives: pl.DataFrame, datasets_cache: str
) -> None:
    lines = _jsonl(mined / "tevatron.jsonl", datasets_cache)
    passage = {"docid": "string", "title": "string", "text": "string"}
    features = lines.features.to_dict()
    assert {name: feature.get("dtype") for name, feature in features.items() if "dtype" in feature} == {
        "query_id": "string",
        "query": "string",
    }
    for column in ("positive_passages", "negative_passages"):
        assert features[column]["_type"] == "List"
        assert {key: value["dtype"] for key, value in features[column]["feature"].items()} == passage
    pairs = _pairs(negatives)
    assert len(lines) == pairs.height
    for line, (query_id, positive_id) in zip(lines, pairs.select("query_id", "positive_id").rows(), strict=True):
        rows = negatives.filter((pl.col("query_id") == query_id) & (pl.col("positive_id") == positive_id))
        assert line["query_id"] == query_id
        assert line["positive_passages"] == [{"docid": positive_id, "title": "", "text": rows["positive"][0]}]
        assert [p["docid"] for p in line["negative_passages"]] == rows["negative_id"].to_list()
        assert [p["text"] for p in line["negative_passages"]] == rows["negative"].to_list()


# --- training on the files ---------------------------------------------------------------------------------


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def _check_trained(trainer: Any, model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert trainer.state.global_step == MAX_STEPS
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == MAX_STEPS
    assert all(math.isfinite(loss) for loss in losses), losses
    changed = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])]
    # Every tensor on the loss's path moves; BERT's unused pooler (mean pooling) may not.
    assert len(changed) > len(before) // 2, changed


def _arguments(cls: type, out: Path, **extra: Any) -> Any:
    return cls(
        output_dir=str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH_SIZE,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=7,
        **extra,
    )


def _train_bi_encoder(
    bundled_model_path: Path, dataset: Dataset, make_loss: Callable[[Any], torch.nn.Module], out: Path
) -> None:
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    # A fresh copy: training must not touch the session's shared embedding model.
    model = SentenceTransformer(str(bundled_model_path), device="cpu")
    model.max_seq_length = MAX_TOKENS
    before = _snapshot(model)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=_arguments(SentenceTransformerTrainingArguments, out),
        train_dataset=dataset,
        loss=make_loss(model),
    )
    trainer.train()
    _check_trained(trainer, model, before)


@pytest.mark.parametrize("file_name", ["triplets.parquet", "ntuples.parquet"])
def test_sentence_transformer_trains_on_mnrl_files(
    file_name: str, mined: Path, bundled_model_path: Path, datasets_cache: str, tmp_path: Path
) -> None:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    dataset = _parquet(mined / file_name, datasets_cache)
    assert len(dataset) >= MAX_STEPS * BATCH_SIZE
    _train_bi_encoder(bundled_model_path, dataset, MultipleNegativesRankingLoss, tmp_path / "trained")


def test_sentence_transformer_distils_margins(
    mined: Path, bundled_model_path: Path, datasets_cache: str, tmp_path: Path
) -> None:
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss

    dataset = _parquet(mined / "margin-mse.parquet", datasets_cache)
    assert dataset.features["label"].dtype == "float32"
    _train_bi_encoder(bundled_model_path, dataset, MarginMSELoss, tmp_path / "trained")


def test_cross_encoder_trains_on_labeled_pairs(
    mined: Path, tiny_cross_encoder: Path, datasets_cache: str, tmp_path: Path
) -> None:
    dataset = _parquet(mined / "labeled-pairs.parquet", datasets_cache).shuffle(seed=7)
    assert set(dataset["label"]) == {0.0, 1.0}
    _train_cross_encoder(tiny_cross_encoder, dataset, tmp_path / "trained")


def _train_cross_encoder(model_path: Path, dataset: Any, out: Path) -> None:
    """Real training steps of a CrossEncoder with BinaryCrossEntropyLoss on (text, text, label) rows."""
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    model = CrossEncoder(str(model_path), device="cpu", max_length=MAX_TOKENS)
    before = _snapshot(model)
    trainer = CrossEncoderTrainer(
        model=model,
        args=_arguments(CrossEncoderTrainingArguments, out),
        train_dataset=dataset,
        loss=BinaryCrossEntropyLoss(model),
    )
    trainer.train()
    _check_trained(trainer, model, before)


def test_flagembedding_runner_distils_from_its_file(mined: Path, bundled_model_path: Path, tmp_path: Path) -> None:
    """FlagEmbedding's own fine-tuning runner: its dataset reads flagembedding.jsonl, with the teacher scores."""
    from FlagEmbedding.finetune.embedder.encoder_only.base import (
        EncoderOnlyEmbedderDataArguments,
        EncoderOnlyEmbedderModelArguments,
        EncoderOnlyEmbedderRunner,
        EncoderOnlyEmbedderTrainingArguments,
    )

    path = mined / "flagembedding.jsonl"
    runner = EncoderOnlyEmbedderRunner(
        EncoderOnlyEmbedderModelArguments(model_name_or_path=str(bundled_model_path)),
        EncoderOnlyEmbedderDataArguments(
            train_data=[str(path)],
            train_group_size=NUM_NEGATIVES + 1,
            knowledge_distillation=True,
            query_max_len=MAX_TOKENS,
            passage_max_len=MAX_TOKENS,
            cache_path=str(tmp_path / "data-cache"),
        ),
        _arguments(EncoderOnlyEmbedderTrainingArguments, tmp_path / "trained", sentence_pooling_method="mean"),
    )
    first = json.loads(path.read_text().split("\n", 1)[0])
    query, passages, teacher_scores = runner.train_dataset[0]
    assert len(runner.train_dataset) == _file_rows(path)
    assert query == first["query"]
    assert passages[0] == first["pos"][0]
    assert set(passages[1:]) <= set(first["neg"])
    assert teacher_scores[0] == pytest.approx(first["pos_scores"][0])
    before = _snapshot(runner.model)
    runner.trainer.train()
    _check_trained(runner.trainer, runner.model, before)
