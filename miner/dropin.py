"""`mine_hard_negatives`: sentence-transformers' function of that name, with this project's pipeline underneath.

The parameters are those of `sentence_transformers.util.mine_hard_negatives` (sentence-transformers 6.2), with the
same names and meaning, and the result is a `datasets.Dataset` with the columns and row order that function
documents for each `output_format`. Underneath, the rows come from `miner.run.mine`, exactly as `miner mine` makes
them: the inputs are written as a pairs table and a corpus table and read by the same ingest, so every check and
every stage is the CLI's.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from miner import export
from miner.config import MineConfig
from miner.errors import InputError
from miner.run import mine

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
SAMPLING_STRATEGIES = ("top", "random", "simans")

# Dotted config key -> the argument of this function that sets it, so a refused value is reported by the name
# the caller used.
_ARGUMENTS = {
    "filter.range_min": "range_min",
    "filter.range_max": "range_max",
    "filter.max_score": "max_score",
    "filter.min_score": "min_score",
    "filter.margin": "absolute_margin",
    "filter.pct": "relative_margin",
    "sample.num_negatives": "num_negatives",
    "sample.strategy": "sampling_strategy",
    "sample.seed": "seed",
    "models.batch_size": "batch_size",
    "models.teacher_batch_size": "batch_size",
    "filter.expansion_depth": "expansion_depth",
    "filter.hardness_target": "hardness_target",
    "filter.max_false_negatives": "max_false_negatives",
    "retrieval.bm25": "bm25",
    "formats": "formats",
    "threads": "threads",
}


def mine_hard_negatives(
    dataset: Any,
    model: Any,
    anchor_column_name: str | None = None,
    positive_column_name: str | None = None,
    corpus: Iterable[str] | None = None,
    cross_encoder: Any = None,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    num_negatives: int = 3,
    sampling_strategy: Literal["top", "random", "simans"] = "top",
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    include_positives: bool = False,
    output_format: Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"] = "triplet",
    output_scores: bool = False,
    batch_size: int = 32,
    faiss_batch_size: int = 16384,
    use_faiss: bool = False,
    use_multi_process: list[str] | bool = False,
    verbose: bool = True,
    cache_folder: str | Path | None = None,
    *,
    bm25: bool | None = None,
    expansion_depth: int | Literal["auto"] | None = None,
    hardness_target: float | None = None,
    max_false_negatives: float | None = None,
    seed: int | None = None,
    threads: int | None = None,
    out: str | Path | None = None,
    formats: Sequence[str] | str | None = None,
) -> Dataset:
    """Mine hard negatives for a dataset of (anchor, positive) pairs; sentence-transformers' parameters and output.

    Inputs, window, scores, prompts and output mean what they mean in `sentence_transformers.util.
    mine_hard_negatives`; `model` and `cross_encoder` take a loaded model or a name/path (`"all-MiniLM-L6-v2"` is
    the bundled model). Returned columns, per `output_format` (the anchor and positive columns keep their names):

    - "triplet": (anchor, positive, negative[, scores = [positive score, negative score]]), one row per
      negative, grouped by anchor in the order anchors first appear, negatives hardest first;
    - "n-tuple": (anchor, positive, negative_1 .. negative_n[, scores]), one row per input row whose pair got
      all `num_negatives` negatives, in input order;
    - "labeled-pair": (anchor, positive, label 1/0 | score): per anchor, its positives, then its distinct negatives;
    - "labeled-list": (anchor, positive = [positive, negatives...], labels = [1, 0, ...] | scores), one row per
      input row with at least one negative.

    How the mapping works, and where results differ from sentence-transformers:

    - Candidates come from dense retrieval (faiss, exact) and BM25 (`bm25=False` turns it off), and this
      project's false-negative filter runs first: each query's candidates with the most evidence of relevance
      are cut (`expansion_depth`, "auto" by default, chosen by `hardness_target`; `max_false_negatives` sets a
      budget instead). sentence-transformers has no such filter, so the negatives are less often unlabelled
      positives but somewhat less hard. `expansion_depth=0` turns it off (and is the default with
      `include_positives`, whose positives it would cut).
    - `range_min`/`range_max` are the filter's rank window over the teacher's ranking; `range_max=None` means no
      upper limit (sentence-transformers derives a small one from `num_negatives`).
    - `max_score` is the TopK-Abs rule, `absolute_margin` TopK-MarginPos, `relative_margin` TopK-PercPos with
      pct = 1 - relative_margin (all against the weakest positive of the query, as there); at most one of them.
      `min_score` drops candidates scored below it.
    - Negatives are sampled per (anchor, positive), not per anchor: an anchor with several positives gets
      negatives for each (sentence-transformers repeats one set). `sampling_strategy="simans"` is also accepted;
      random draws are seeded (`seed`), so a call is reproducible.
    - Pairs that got no negative are in no format (sentence-transformers keeps their positives in
      "labeled-pair").
    - `faiss_batch_size`, `use_faiss` and `use_multi_process` change no row here: search is always faiss, a
      block of vectors at a time, with every core (`threads`).
    - `cache_folder=None` uses this project's embedding cache (`$MINER_CACHE_DIR`, content-addressed: prompts
      and models are part of the key); a folder puts it there.

    `out`, a folder, also receives the usual files of `miner mine` (`formats`, the project's default set if not
    given), the dataset card and the manifest. Bad arguments raise ValueError (a value) or TypeError (a type)
    naming the argument, before any model runs.
    """
    table = _as_table(dataset)
    anchor = _column(table, anchor_column_name, "anchor_column_name", 0)
    positive = _column(table, positive_column_name, "positive_column_name", 1)
    if anchor == positive:
        raise ValueError(f"anchor_column_name and positive_column_name both name '{anchor}'; give two columns")
    _check_choices(output_format, sampling_strategy, include_positives)
    texts = _texts(corpus)
    settings = _settings(
        range_min=range_min,
        range_max=range_max,
        max_score=max_score,
        min_score=min_score,
        absolute_margin=absolute_margin,
        relative_margin=relative_margin,
        num_negatives=num_negatives,
        sampling_strategy=sampling_strategy,
        include_positives=include_positives,
        batch_size=batch_size,
        faiss_batch_size=faiss_batch_size,
        prompts=(query_prompt, query_prompt_name, corpus_prompt, corpus_prompt_name),
        own={
            "retrieval.bm25": bm25,
            "filter.expansion_depth": 0 if include_positives and expansion_depth is None else expansion_depth,
            "filter.hardness_target": hardness_target,
            "filter.max_false_negatives": max_false_negatives,
            "sample.seed": seed,
            "threads": threads,
            "formats": formats,
        },
    )
    settings.update(show_progress=verbose, engine="local")
    if cache_folder is not None:
        settings["cache_dir"] = str(cache_folder)
    _check_prompt_names(model, query_prompt, query_prompt_name, corpus_prompt, corpus_prompt_name)
    if include_positives and output_format != "n-tuple":
        # sentence-transformers does the same: only the n-tuple keeps a ranking's order.
        log.warning('include_positives=True: output_format is set to "n-tuple" to keep the ranking order')
        output_format = "n-tuple"

    def configured(folder: Path | None) -> MineConfig:
        """The run's config; with `folder` None, checked on stand-in paths before anything is written or saved."""
        place = folder or Path(tempfile.gettempdir())
        models = {
            "embedding_model": _model_location(model, "model", folder and folder / "model"),
            "cross_encoder": _model_location(cross_encoder, "cross_encoder", folder and folder / "cross-encoder"),
        }
        paths = {"data": place / "pairs.parquet", "corpus": place / "corpus.parquet", "out": out or place / "out"}
        nested = {**settings, "models": {**settings.get("models", {}), **models}}
        return _config({key: str(path) for key, path in paths.items()}, nested)

    configured(None)
    with tempfile.TemporaryDirectory(prefix="miner-dropin-") as scratch:
        rows, documents = _write_inputs(table, anchor, positive, texts, Path(scratch))
        config = configured(Path(scratch))
        target = config.out
        try:
            mine(config, logger=log)
        except InputError as error:
            raise ValueError(str(error)) from error
        negatives = pq.read_table(target / export.NEGATIVES_FILE)
    return _as_dataset(
        _negatives_per_pair(negatives, documents),
        rows,
        anchor,
        positive,
        output_format,
        output_scores,
        config.sample.num_negatives,
    )


# --- arguments ------------------------------------------------------------------------------------------------


def _as_table(dataset: Any) -> pa.Table:
    """A datasets.Dataset, or a pyarrow / polars / pandas table, as an Arrow table."""
    if isinstance(dataset, pa.Table):
        return dataset
    if isinstance(dataset, pl.DataFrame):
        return dataset.to_arrow()
    kind = f"{type(dataset).__module__}.{type(dataset).__qualname__}"
    if kind == "datasets.arrow_dataset.Dataset":
        # Through the arrow formatter: a selected or shuffled Dataset is an index over its table, not the table.
        return dataset.with_format("arrow")[:]
    if kind == "pandas.core.frame.DataFrame":
        return pa.Table.from_pandas(dataset, preserve_index=False)
    raise TypeError(
        f"dataset: expected a datasets.Dataset or a table (pyarrow.Table, polars or pandas DataFrame), got {kind}"
    )


def _column(table: pa.Table, name: str | None, argument: str, position: int) -> str:
    columns = table.column_names
    if name is None:
        if len(columns) <= position:
            raise ValueError(
                f"{argument}: the dataset has {len(columns)} column(s) ({', '.join(columns)}); "
                "give a dataset with an anchor and a positive column"
            )
        name = columns[position]
    if name not in columns:
        raise ValueError(f"{argument}: '{name}' is not a column of the dataset (columns: {', '.join(columns)})")
    if not pa.types.is_string(table.schema.field(name).type) and not pa.types.is_large_string(
        table.schema.field(name).type
    ):
        raise ValueError(f"{argument}: column '{name}' holds {table.schema.field(name).type}, not text")
    return name


def _check_choices(output_format: str, sampling_strategy: str, include_positives: bool) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format: '{output_format}' is not one of {', '.join(OUTPUT_FORMATS)}")
    if sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling_strategy: '{sampling_strategy}' is not one of {', '.join(SAMPLING_STRATEGIES)}")
    if not isinstance(include_positives, bool):
        raise TypeError(f"include_positives: expected True or False, got {type(include_positives).__name__}")


def _texts(corpus: Iterable[str] | None) -> list[str]:
    if corpus is None:
        return []
    # Any iterable of texts (a list, a Dataset column, a numpy array); a lone string or a mapping is a mistake.
    if isinstance(corpus, str | bytes | Mapping) or not isinstance(corpus, Iterable):
        raise TypeError(f"corpus: expected a list of texts, got {type(corpus).__name__}")
    texts = [str(text) if isinstance(text, str) else text for text in corpus]  # numpy's str_ as str
    wrong = next((text for text in texts if not isinstance(text, str)), None)
    if wrong is not None:
        raise TypeError(f"corpus: expected a list of texts, found a {type(wrong).__name__}")
    return texts


def _settings(
    *,
    range_min: int,
    range_max: int | None,
    max_score: float | None,
    min_score: float | None,
    absolute_margin: float | None,
    relative_margin: float | None,
    num_negatives: int,
    sampling_strategy: str,
    include_positives: bool,
    batch_size: int,
    faiss_batch_size: int,
    prompts: tuple[str | None, str | None, str | None, str | None],
    own: dict[str, Any],
) -> dict[str, Any]:
    """The arguments as a nested config dict; only what was given, so the rest keeps this project's defaults."""
    rules = {"max_score": max_score, "absolute_margin": absolute_margin, "relative_margin": relative_margin}
    given = [name for name, value in rules.items() if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"{' and '.join(given)}: give at most one of max_score, absolute_margin, relative_margin "
            "(the filter applies one teacher-relative rule)"
        )
    if not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives: must be a whole number of at least 1, got {num_negatives!r}")
    if range_max is not None and range_max - range_min < num_negatives:
        raise ValueError(
            f"range_max: the window range_min {range_min} .. range_max {range_max} holds fewer candidates than "
            f"num_negatives ({num_negatives}); allowed: range_max >= range_min + num_negatives"
        )
    if faiss_batch_size <= 0:
        raise ValueError(f"faiss_batch_size: must be a positive whole number, got {faiss_batch_size}")
    dotted: dict[str, Any] = {
        "filter.range_min": range_min,
        "filter.range_max": range_max,
        "filter.min_score": min_score,
        "filter.include_positives": include_positives,
        "sample.num_negatives": num_negatives,
        "sample.strategy": sampling_strategy,
        "models.batch_size": batch_size,
        "models.teacher_batch_size": batch_size,
        "models.query_prompt": prompts[0],
        "models.query_prompt_name": prompts[1],
        "models.document_prompt": prompts[2],
        "models.document_prompt_name": prompts[3],
        **own,
    }
    if max_score is not None:
        dotted.update({"filter.method": "topk-abs", "filter.max_score": max_score})
    if absolute_margin is not None:
        dotted.update({"filter.method": "topk-marginpos", "filter.margin": absolute_margin})
    if relative_margin is not None:
        if not 0 <= relative_margin < 1:
            raise ValueError(f"relative_margin: must be at least 0 and below 1, got {relative_margin}")
        dotted.update({"filter.method": "topk-percpos", "filter.pct": 1.0 - relative_margin})
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        target = nested
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return nested


def _config(paths: dict[str, str], settings: dict[str, Any]) -> MineConfig:
    try:
        return MineConfig.model_validate({**paths, **settings})
    except ValidationError as error:
        first = error.errors()[0]
        dotted = ".".join(str(part) for part in first["loc"])
        argument = _ARGUMENTS.get(dotted, dotted or "arguments")
        raise ValueError(f"{argument}: {first['msg'].removeprefix('Value error, ')}") from None


def _is_model_object(value: Any, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(value).__mro__)


def _check_prompt_names(model: Any, *prompts: str | None) -> None:
    """Prompt names a loaded model lacks are refused now; a model given by name is checked when it loads."""
    query_prompt, query_name, corpus_prompt, corpus_name = prompts
    if not _is_model_object(model, "SentenceTransformer"):
        return
    for argument, name, text in (
        ("query_prompt_name", query_name, query_prompt),
        ("corpus_prompt_name", corpus_name, corpus_prompt),
    ):
        if name is not None and text is None and name not in model.prompts:
            raise ValueError(f"{argument}: '{name}' is not a prompt of the model (prompts: {', '.join(model.prompts)})")


def _model_location(model: Any, argument: str, folder: Path | None) -> str | None:
    """A model name or folder as given; a loaded model is saved to `folder` so the pipeline loads the same weights
    (and the cache keys them by their bytes). With `folder` None only the type is checked."""
    if model is None and argument == "cross_encoder":
        return None
    if isinstance(model, str | Path):
        return str(model)
    wanted = "SentenceTransformer" if argument == "model" else "CrossEncoder"
    if not _is_model_object(model, wanted):
        raise TypeError(f"{argument}: expected a {wanted} or a model name or folder, got {type(model).__name__}")
    if folder is None:
        return "loaded model"
    model.save(str(folder))
    return str(folder)


# --- inputs and output ----------------------------------------------------------------------------------------


def _write_inputs(
    table: pa.Table, anchor: str, positive: str, corpus: list[str], folder: Path
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Write the pairs (by query text and id, positive by id) and the corpus (the given texts, then the positives,
    each distinct text once, as sentence-transformers builds its corpus) as the tables `miner mine` reads.

    Returns the input rows with their ids, and the documents (doc_id, text) as given, so the output carries the
    caller's own texts.
    """
    rows = pl.from_arrow(table.select([anchor, positive])).rename({anchor: "anchor", positive: "positive"})
    texts = list(dict.fromkeys([*corpus, *rows["positive"].drop_nulls().to_list()]))
    documents = pl.DataFrame(
        {"doc_id": [f"d{n}" for n in range(len(texts))], "text": texts},
        schema=pl.Schema({"doc_id": pl.String, "text": pl.String}),
    )
    anchors = rows["anchor"].drop_nulls().unique(maintain_order=True).to_list()
    query_ids = {text: f"q{n}" for n, text in enumerate(anchors)}
    doc_ids = dict(zip(texts, documents["doc_id"].to_list(), strict=True))
    rows = rows.with_row_index("_row").with_columns(
        query_id=pl.col("anchor").replace_strict(query_ids, default=None, return_dtype=pl.String),
        positive_id=pl.col("positive").replace_strict(doc_ids, default=None, return_dtype=pl.String),
    )
    # Null texts stay null here, so ingest refuses them with the row they are on.
    rows.select(query_id="query_id", query="anchor", positive_id="positive_id").write_parquet(folder / "pairs.parquet")
    documents.select(_id="doc_id", text="text").write_parquet(folder / "corpus.parquet")
    return rows, documents


def _negatives_per_pair(negatives: pa.Table, documents: pl.DataFrame) -> pl.DataFrame:
    """One row per (query, positive): its negatives' texts (as given) and scores, hardest first."""
    frame = pl.from_arrow(
        negatives.select(
            ["query_id", "positive_id", "negative_id", "positive_score", "negative_score", "negative_rank"]
        )
    )
    return (
        frame.with_row_index("_i")
        .join(documents.rename({"doc_id": "negative_id", "text": "negative"}), on="negative_id", how="left")
        .sort(["query_id", "positive_id", "negative_rank", "_i"])
        .group_by(["query_id", "positive_id"], maintain_order=True)
        .agg(
            positive_score=pl.col("positive_score").first(),
            negatives=pl.col("negative"),
            negative_ids=pl.col("negative_id"),
            negative_scores=pl.col("negative_score"),
        )
    )


def _as_dataset(
    per_pair: pl.DataFrame,
    rows: pl.DataFrame,
    anchor: str,
    positive: str,
    output_format: str,
    output_scores: bool,
    num_negatives: int,
) -> Dataset:
    from datasets import Dataset

    joined = rows.join(per_pair, on=["query_id", "positive_id"], how="inner", maintain_order="left")
    if output_format == "triplet":
        # One group per anchor, in the order anchors first appear; within it, its pairs in input order.
        first = joined.unique(["query_id", "positive_id"], keep="first", maintain_order=True)
        anchor_order = first.group_by("query_id", maintain_order=True).agg(_a=pl.col("_row").min())
        exploded = (
            first.join(anchor_order, on="query_id", maintain_order="left")
            .sort(["_a", "_row"], maintain_order=True)
            .explode(["negatives", "negative_scores"])
        )
        columns: dict[str, Any] = {
            anchor: exploded["anchor"],
            positive: exploded["positive"],
            "negative": exploded["negatives"],
        }
        if output_scores:
            columns["scores"] = exploded.select(pl.concat_list("positive_score", "negative_scores"))
    elif output_format == "n-tuple":
        complete = joined.filter(pl.col("negatives").list.len() >= num_negatives)
        columns = {anchor: complete["anchor"], positive: complete["positive"]}
        for i in range(num_negatives):
            columns[f"negative_{i + 1}"] = complete["negatives"].list.get(i)
        if output_scores:
            columns["scores"] = complete.select(
                pl.concat_list("positive_score", pl.col("negative_scores").list.head(num_negatives))
            )
    elif output_format == "labeled-list":
        columns = {
            anchor: joined["anchor"],
            positive: joined.select(pl.concat_list("positive", "negatives")),
        }
        if output_scores:
            columns["scores"] = joined.select(pl.concat_list("positive_score", "negative_scores"))
        else:
            columns["labels"] = joined.select(
                pl.concat_list(pl.lit(1, pl.Int64), pl.col("negatives").list.eval(pl.lit(0, pl.Int64)))
            )
    else:
        columns = _labeled_pairs(joined, anchor, positive, output_scores)
    frame = pl.DataFrame({name: _series(values, name) for name, values in columns.items()})
    return Dataset(frame.to_arrow())


def _series(values: pl.Series | pl.DataFrame, name: str) -> pl.Series:
    return (values.to_series() if isinstance(values, pl.DataFrame) else values).rename(name)


def _labeled_pairs(joined: pl.DataFrame, anchor: str, positive: str, output_scores: bool) -> dict[str, pl.Series]:
    """Per anchor, in the order anchors first appear: its positives (label 1), then its distinct negatives (0)."""
    pairs = joined.unique(["query_id", "positive_id"], keep="first", maintain_order=True)
    anchor_order = pairs.group_by("query_id", maintain_order=True).agg(_a=pl.col("_row").min())
    pairs = pairs.join(anchor_order, on="query_id", maintain_order="left")
    positives = pairs.select(
        "_a",
        "anchor",
        _kind=pl.lit(0),
        _order=pl.col("_row").cast(pl.Float64),
        text="positive",
        score=pl.col("positive_score"),
        label=pl.lit(1, pl.Int64),
    )
    negatives = (
        pairs.explode(["negatives", "negative_ids", "negative_scores"])
        .unique(["query_id", "negative_ids"], keep="first", maintain_order=True)
        .select(
            "_a",
            "anchor",
            _kind=pl.lit(1),
            _order=(-pl.col("negative_scores")).cast(pl.Float64),
            text="negatives",
            score=pl.col("negative_scores"),
            label=pl.lit(0, pl.Int64),
        )
    )
    rows = pl.concat([positives, negatives]).sort(["_a", "_kind", "_order"], maintain_order=True)
    value = "score" if output_scores else "label"
    return {anchor: rows["anchor"], positive: rows["text"], value: rows[value]}
