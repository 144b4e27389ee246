"""`from miner import mine_hard_negatives`: sentence-transformers' parameters and formats over the real pipeline.

Every call mines a Cranfield subset with the bundled model; the session's embedding cache makes repeated calls
cheap. The output folder of `miner mine --format all` is also checked as a dataset (`load_dataset(OUT, name)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import CRANFIELD, _read_jsonl, run_cli, write_jsonl
from datasets import Dataset, load_dataset

from miner import card, formats, mine_hard_negatives
from miner.models import embed_table, prompted_model_key

NUM_NEGATIVES = 3
QUERIES = 12
EXTRA_DOCS = 120


@pytest.fixture(scope="module")
def cranfield_pairs() -> tuple[list[tuple[str, str]], list[str]]:
    """(query, positive) texts of the first Cranfield queries, and a corpus: their positives' texts and others."""
    queries = {q["_id"]: q["text"] for q in _read_jsonl(CRANFIELD / "queries.jsonl")[:QUERIES]}
    documents = {d["_id"]: d["text"].strip() for d in _read_jsonl(CRANFIELD / "corpus.jsonl")}
    qrels = [line.split("\t") for line in (CRANFIELD / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    # Each distinct text once (Cranfield repeats a few documents): `miner mine` given the same texts under two ids
    # would mine both, the drop-in, like sentence-transformers, one.
    pairs = list(dict.fromkeys((queries[q], documents[d]) for q, d, _ in qrels if q in queries and documents.get(d)))
    judged = {d for q, d, _ in qrels if q in queries}
    corpus = [text for doc_id, text in documents.items() if text and (doc_id in judged or int(doc_id) <= EXTRA_DOCS)]
    return pairs, list(dict.fromkeys(corpus))


@pytest.fixture(scope="module")
def dataset(cranfield_pairs: tuple[list[tuple[str, str]], list[str]]) -> Dataset:
    pairs, _ = cranfield_pairs
    # Column names of the caller's own: they must carry through to the output.
    return Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [p for _, p in pairs]})


@pytest.fixture(scope="module")
def corpus(cranfield_pairs: tuple[list[tuple[str, str]], list[str]]) -> list[str]:
    return cranfield_pairs[1]


def _mine(dataset: Dataset, corpus: list[str], **arguments: Any) -> Dataset:
    arguments = {"num_negatives": NUM_NEGATIVES, "verbose": False, **arguments}
    return mine_hard_negatives(dataset, "all-MiniLM-L6-v2", corpus=corpus, **arguments)


@pytest.fixture(scope="module")
def reference(dataset: Dataset, corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    """One triplet call that also writes every file `miner mine --format all` writes."""
    out = tmp_path_factory.mktemp("dropin") / "out"
    return _mine(dataset, corpus, out=out, formats="all", output_scores=True), out


@pytest.fixture(scope="module")
def negatives(reference: tuple[Dataset, Path]) -> pl.DataFrame:
    return pl.read_parquet(reference[1] / "negatives.parquet")


def _positives_of(dataset: Dataset) -> dict[str, set[str]]:
    positives: dict[str, set[str]] = {}
    for question, answer in zip(dataset["question"], dataset["answer"], strict=True):
        positives.setdefault(question, set()).add(answer)
    return positives


# --- output formats ---------------------------------------------------------------------------------------------


def test_triplets_are_the_pipeline_rows_grouped_by_anchor(reference: tuple[Dataset, Path], dataset: Dataset) -> None:
    triplets, out = reference
    assert triplets.column_names == ["question", "answer", "negative", "scores"]
    exported = pl.read_parquet(out / "triplets.parquet")
    assert triplets.num_rows == exported.height > 0
    assert sorted(zip(triplets["question"], triplets["answer"], triplets["negative"], strict=True)) == sorted(
        exported.iter_rows()
    )
    # Anchors in the order they first appear in the input, each anchor's rows together, hardest negative first.
    anchors = list(dict.fromkeys(triplets["question"]))
    assert anchors == [q for q in dict.fromkeys(dataset["question"]) if q in set(anchors)]
    runs = [q for i, q in enumerate(triplets["question"]) if i == 0 or triplets["question"][i - 1] != q]
    assert runs == anchors
    positives = _positives_of(dataset)
    hardest_first: dict[tuple[str, str], list[float]] = {}
    for row in triplets:
        assert row["answer"] in positives[row["question"]] and row["negative"] not in positives[row["question"]]
        assert len(row["scores"]) == 2
        hardest_first.setdefault((row["question"], row["answer"]), []).append(row["scores"][1])
    assert all(scores == sorted(scores, reverse=True) for scores in hardest_first.values())


@pytest.mark.parametrize("output_scores", [False, True])
def test_ntuples(dataset: Dataset, corpus: list[str], reference: tuple[Dataset, Path], output_scores: bool) -> None:
    ntuples = _mine(dataset, corpus, output_format="n-tuple", output_scores=output_scores)
    names = ["question", "answer", *[f"negative_{i}" for i in range(1, NUM_NEGATIVES + 1)]]
    assert ntuples.column_names == names + (["scores"] if output_scores else [])
    exported = pl.read_parquet(reference[1] / "ntuples.parquet")
    assert ntuples.num_rows == exported.height > 0
    assert sorted(tuple(row[n] for n in names) for row in ntuples) == sorted(exported.iter_rows())
    # One row per input row, in input order.
    order = {pair: i for i, pair in enumerate(zip(dataset["question"], dataset["answer"], strict=True))}
    rows = [order[(q, a)] for q, a in zip(ntuples["question"], ntuples["answer"], strict=True)]
    assert rows == sorted(rows)
    if output_scores:
        assert all(len(scores) == NUM_NEGATIVES + 1 for scores in ntuples["scores"])
        assert all(scores[1:] == sorted(scores[1:], reverse=True) for scores in ntuples["scores"])


@pytest.mark.parametrize("output_scores", [False, True])
def test_labeled_pairs(dataset: Dataset, corpus: list[str], negatives: pl.DataFrame, output_scores: bool) -> None:
    pairs = _mine(dataset, corpus, output_format="labeled-pair", output_scores=output_scores)
    value = "score" if output_scores else "label"
    assert pairs.column_names == ["question", "answer", value]
    distinct_positives = negatives.unique(["query_id", "positive_id"]).height
    distinct_negatives = negatives.unique(["query_id", "negative_id"]).height
    assert pairs.num_rows == distinct_positives + distinct_negatives
    positives = _positives_of(dataset)
    texts = zip(pairs["question"], pairs["answer"], strict=True)
    is_positive = [answer in positives[question] for question, answer in texts]
    if output_scores:
        assert all(isinstance(score, float) for score in pairs["score"])
    else:
        assert pairs["label"] == [int(flag) for flag in is_positive]
    # Per anchor: its positives, then its negatives.
    for question in set(pairs["question"]):
        flags = [flag for q, flag in zip(pairs["question"], is_positive, strict=True) if q == question]
        assert flags == sorted(flags, reverse=True)


@pytest.mark.parametrize("output_scores", [False, True])
def test_labeled_lists(dataset: Dataset, corpus: list[str], negatives: pl.DataFrame, output_scores: bool) -> None:
    lists = _mine(dataset, corpus, output_format="labeled-list", output_scores=output_scores)
    value = "scores" if output_scores else "labels"
    assert lists.column_names == ["question", "answer", value]
    assert lists.num_rows == negatives.unique(["query_id", "positive_id"]).height
    positives = _positives_of(dataset)
    for row in lists:
        documents, values = row["answer"], row[value]
        assert len(documents) == len(values) >= 2
        assert documents[0] in positives[row["question"]]
        assert not positives[row["question"]] & set(documents[1:])
        if not output_scores:
            assert values == [1] + [0] * (len(documents) - 1)


def test_triplets_train_a_sentence_transformer(
    dataset: Dataset, corpus: list[str], bundled_model_path: Path, tmp_path: Path
) -> None:
    """Without scores, a triplet result goes straight into SentenceTransformerTrainer (two real steps)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from test_trainers import _train_bi_encoder

    triplets = _mine(dataset.select(range(20)), corpus, output_format="triplet")
    assert triplets.column_names == ["question", "answer", "negative"]
    _train_bi_encoder(bundled_model_path, triplets, MultipleNegativesRankingLoss, tmp_path / "trained")


# --- sampling, window and scores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "simans"])
def test_sampling_strategies_draw_other_negatives_from_the_same_survivors(
    dataset: Dataset, corpus: list[str], reference: tuple[Dataset, Path], strategy: str
) -> None:
    drawn = _mine(dataset, corpus, sampling_strategy=strategy, output_scores=True)
    top = reference[0]
    assert drawn.num_rows == top.num_rows
    triples = set(zip(drawn["question"], drawn["answer"], drawn["negative"], strict=True))
    assert triples != set(zip(top["question"], top["answer"], top["negative"], strict=True))
    positives = _positives_of(dataset)
    assert all(negative not in positives[question] for question, _, negative in triples)
    # The top strategy takes the hardest, so a draw's negatives score no higher on average.
    assert np.mean([s[1] for s in drawn["scores"]]) <= np.mean([s[1] for s in top["scores"]])


def test_min_score_and_relative_margin(dataset: Dataset, corpus: list[str], reference: tuple[Dataset, Path]) -> None:
    floor = float(np.quantile([s[1] for s in reference[0]["scores"]], 0.2))
    mined = _mine(dataset, corpus, min_score=floor, relative_margin=0.1, output_scores=True)
    assert mined.num_rows > 0
    assert all(negative_score >= floor for _, negative_score in mined["scores"])
    # relative_margin 0.1: a negative scores at most the query's weakest positive less 10% of its magnitude.
    weakest: dict[str, float] = {}
    for question, (positive_score, _) in zip(mined["question"], mined["scores"], strict=True):
        weakest[question] = min(weakest.get(question, positive_score), positive_score)
    for question, (_, negative_score) in zip(mined["question"], mined["scores"], strict=True):
        assert negative_score <= weakest[question] - 0.1 * abs(weakest[question]) + 1e-6


def test_include_positives_ranks_them_among_the_negatives(dataset: Dataset, corpus: list[str]) -> None:
    ranked = _mine(dataset, corpus, include_positives=True, output_format="triplet")
    # As in sentence-transformers, include_positives keeps the ranking in an n-tuple.
    assert ranked.column_names == ["question", "answer", *[f"negative_{i}" for i in range(1, NUM_NEGATIVES + 1)]]
    positives = _positives_of(dataset)
    negatives = [f"negative_{i}" for i in range(1, NUM_NEGATIVES + 1)]
    assert any(row[name] in positives[row["question"]] for row in ranked for name in negatives)


# --- arguments ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"anchor_column_name": "query"}, r"anchor_column_name: 'query' is not a column .*question, answer"),
        ({"positive_column_name": "pos"}, r"positive_column_name: 'pos' is not a column"),
        ({"output_format": "triplets"}, r"output_format: 'triplets' is not one of triplet, n-tuple, labeled-pair"),
        ({"sampling_strategy": "hardest"}, r"sampling_strategy: 'hardest' is not one of top, random, simans"),
        ({"range_min": 5, "range_max": 6}, r"range_max: .*range_max >= range_min \+ num_negatives"),
        ({"max_score": 0.9, "relative_margin": 0.05}, r"max_score and relative_margin: give at most one"),
        ({"relative_margin": 1.5}, r"relative_margin: must be at least 0 and below 1"),
        ({"num_negatives": 0}, r"num_negatives: must be a whole number of at least 1"),
        ({"hardness_target": 2.0}, r"hardness_target: Input should be less than or equal to 1.5"),
    ],
)
def test_bad_arguments_are_refused_before_any_model_runs(
    dataset: Dataset, arguments: dict[str, Any], message: str
) -> None:
    # A model that does not exist: loading it would fail differently, so the refusal came first.
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(dataset, "/no/such/model", verbose=False, **arguments)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([{"question": "q", "answer": "a"}], r"dataset: expected a datasets.Dataset or a table .* got builtins.list"),
        ({"question": ["q"], "answer": ["a"]}, r"got builtins.dict"),
    ],
)
def test_a_dataset_that_is_no_table_is_a_type_error(given: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        mine_hard_negatives(given, "all-MiniLM-L6-v2", verbose=False)


def test_corpus_and_model_types_are_checked(dataset: Dataset) -> None:
    with pytest.raises(TypeError, match=r"corpus: expected a list of texts, got str"):
        mine_hard_negatives(dataset, "all-MiniLM-L6-v2", corpus="one text", verbose=False)
    with pytest.raises(TypeError, match=r"model: expected a SentenceTransformer or a model name or folder, got int"):
        mine_hard_negatives(dataset, 42, verbose=False)


def test_tables_and_loaded_models_are_accepted(
    cranfield_pairs: tuple[list[tuple[str, str]], list[str]], embedding_model: Any
) -> None:
    pairs, corpus = cranfield_pairs
    table = pa.table({"q": [q for q, _ in pairs[:15]], "p": [p for _, p in pairs[:15]], "other": list(range(15))})
    mined = mine_hard_negatives(
        pl.from_arrow(table), embedding_model, "q", "p", corpus=corpus, num_negatives=2, verbose=False
    )
    assert mined.column_names == ["q", "p", "negative"]
    assert mined.num_rows > 0
    with pytest.raises(ValueError, match=r"query_prompt_name: 'nope' is not a prompt of the model"):
        mine_hard_negatives(table, embedding_model, "q", "p", query_prompt_name="nope", verbose=False)


def test_a_loaded_cross_encoder_is_the_teacher(
    dataset: Dataset, corpus: list[str], tiny_cross_encoder: Path, tmp_path: Path
) -> None:
    from sentence_transformers import CrossEncoder

    teacher = CrossEncoder(str(tiny_cross_encoder), device="cpu")
    subset = dataset.select(range(10))
    mined = _mine(subset, corpus, cross_encoder=teacher, output_scores=True, out=tmp_path / "out")
    assert mined.num_rows > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["teacher"].startswith("cross-encoder:")
    # The scores are the teacher's: the same pair scored by the loaded model gives the same number.
    row = mined[0]
    expected = teacher.predict([(row["question"], row["negative"])], batch_size=1)[0]
    assert row["scores"][1] == pytest.approx(float(expected), abs=1e-4)


# --- prompts ------------------------------------------------------------------------------------------------------


def test_a_prompt_changes_the_vectors_and_the_cache_key(embedding_model: Any) -> None:
    texts = pa.table({"id": ["a", "b"], "text": ["wing flutter", "boundary layer"], "text_hash": ["h1", "h2"]})
    options = {"id_column": "id", "kind": "query", "batch_size": 2, "show_progress": False}
    plain = embed_table(embedding_model, texts, **options)
    prompted = embed_table(embedding_model, texts, prompt=("query: ", None), **options)
    assert not np.allclose(plain.vectors, prompted.vectors)
    assert prompted_model_key("k", "query", None) == "k"
    assert prompted_model_key("k", "query", ("query: ", None)) != prompted_model_key("k", "query", ("q: ", None))
    assert prompted_model_key("k", "query", ("query: ", None)) != prompted_model_key("k", "document", ("query: ", None))


def test_a_query_prompt_reaches_the_encoder(dataset: Dataset, corpus: list[str]) -> None:
    subset = dataset.select(range(20))
    plain = _mine(subset, corpus, output_format="labeled-pair", output_scores=True)
    prompted = _mine(subset, corpus, output_format="labeled-pair", output_scores=True, query_prompt="query: ")
    # The bi-encoder teacher's scores are cosines with the query vector: the prompt moves every one of them.
    assert plain["score"][0] != pytest.approx(prompted["score"][0], abs=1e-6)


# --- the same rows as `miner mine` ---------------------------------------------------------------------------------


def test_rows_equal_those_of_miner_mine(
    dataset: Dataset, corpus: list[str], reference: tuple[Dataset, Path], tmp_path: Path
) -> None:
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"query": q, "positive": p} for q, p in zip(dataset["question"], dataset["answer"], strict=True)],
    )
    documents = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"c{i}", "text": t} for i, t in enumerate(corpus)])
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "mine", pairs, "--corpus", documents, "--out", out, "--quiet", "--engine", "local",
        "--num-negatives", str(NUM_NEGATIVES),
    )  # fmt: skip
    assert code == 0, stderr
    cli = pl.read_parquet(out / "triplets.parquet")
    dropin = reference[0]
    assert sorted(zip(dropin["question"], dropin["answer"], dropin["negative"], strict=True)) == sorted(cli.iter_rows())


# --- the output folder is a dataset ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mined_all(tiny_beir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("card") / "out"
    code, _, stderr = run_cli(
        "mine", tiny_beir, "--out", out, "--quiet", "--engine", "local", "--format", "all,batched", "--batch-size", "2"
    )
    assert code == 0, stderr
    return out


@pytest.mark.parametrize("name", list(formats.FILES))
def test_every_exported_file_loads_from_the_folder(
    mined_all: Path, name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`load_dataset(OUT, name)` for every format; a JSONL format's config (its Parquet twin) holds the JSONL's rows."""
    manifest = json.loads((mined_all / "manifest.json").read_text())
    assert card.CARD_FILE in manifest["files"]
    cache = str(tmp_path_factory.mktemp("datasets-cache"))
    file_name = formats.FILES[name]
    loaded = load_dataset(str(mined_all), name, split="train", cache_dir=cache)
    assert loaded.num_rows == manifest["counts"]["export"][file_name] > 0
    if file_name.endswith(".jsonl"):
        assert formats.DATASET_TWINS[file_name] in manifest["files"]
        lines = (mined_all / file_name).read_text().splitlines()
        assert _float32(loaded.to_list()) == _float32([json.loads(line) for line in lines])


def _float32(value: object) -> object:
    """Scores are float32: JSON prints their shortest text, Parquet keeps their bits; both mean the same float32."""
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, list):
        return [_float32(item) for item in value]
    if isinstance(value, dict):
        return {key: _float32(item) for key, item in value.items()}
    return value


def test_the_card_summarises_the_manifest(mined_all: Path) -> None:
    text = (mined_all / card.CARD_FILE).read_text()
    manifest = json.loads((mined_all / "manifest.json").read_text())
    front, _, body = text.removeprefix("---\n").partition("\n---\n")
    assert front.count("config_name:") == len(formats.FILES)
    assert f"{manifest['counts']['sample']['negatives']} negatives" in body
    assert manifest["teacher"] in body


def test_labeled_pairs_train_a_cross_encoder(
    dataset: Dataset, corpus: list[str], tiny_cross_encoder: Path, tmp_path: Path
) -> None:
    """A labeled-pair result goes straight into CrossEncoderTrainer (a real step on the tiny cross-encoder)."""
    from test_trainers import _train_cross_encoder

    pairs = _mine(dataset.select(range(20)), corpus, output_format="labeled-pair")
    assert set(pairs["label"]) == {0, 1}
    _train_cross_encoder(tiny_cross_encoder, pairs, tmp_path / "trained")
