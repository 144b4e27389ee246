"""The one typed config object: built from a TOML file and command-line overrides, validated once."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from miner.errors import InputError
from miner.gates import GateError, parse_gate
from miner.language import AUTO, LANGUAGES, supported


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINER_CACHE_DIR", Path.home() / ".cache" / "hardneg-miner"))


DenseIndexKind = Literal["auto", "flat", "hnsw", "ivf"]


@dataclass(frozen=True)
class DenseIndexSpec:
    """Which faiss index dense retrieval searches; the approximate ones' settings."""

    kind: DenseIndexKind = "auto"
    # "auto": exact search up to this many documents, HNSW above.
    ann_threshold: int = 1_000_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 256
    ivf_nprobe: int = 32
    # Queries sampled to measure an approximate index's recall@k against exact search; 0 skips it.
    recall_queries: int = 200
    # IVF's k-means and the recall sample.
    seed: int = 0

    def resolve(self, documents: int) -> Literal["flat", "hnsw", "ivf"]:
        if self.kind == "auto":
            return "hnsw" if documents > self.ann_threshold else "flat"
        return self.kind


# Weights' precision (miner/precision.py): `auto` asks the CPU.
Precision = Literal["float32", "bfloat16"]
RequestedPrecision = Literal["auto", "float32", "bfloat16"]
FilterMethod = Literal["none", "topk-abs", "topk-marginpos", "topk-percpos"]
PositiveReference = Literal["min", "mean", "max"]
SamplingStrategy = Literal["top", "random", "simans"]
Engine = Literal["auto", "local", "prefect"]
# Training files a run can write (miner/formats.py); `all` on the command line or in TOML picks every one.
ExportFormat = Literal[
    "negatives",
    "triplets",
    "ntuples",
    "labeled-pairs",
    "flagembedding",
    "tevatron",
    "margin-mse",
    "batched-triplets",
    "batched-ntuples",
]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
DEFAULT_FORMATS: tuple[str, ...] = ("negatives", "triplets", "ntuples")
# Ordered into training batches (miner/batches.py): they need `batches.size`, so `all` leaves them out and
# `batched` picks both.
BATCHED_FORMATS: tuple[str, ...] = ("batched-triplets", "batched-ntuples")
ALL_FORMATS: tuple[str, ...] = tuple(name for name in EXPORT_FORMATS if name not in BATCHED_FORMATS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_ANN = DenseIndexSpec()  # the approximate-index defaults, written once


class RetrievalConfig(_Section):
    bm25: bool = True
    bm25_k: int = Field(100, ge=1, description="BM25 hits per query")
    bm25_k1: float = Field(0.9, gt=0)
    bm25_b: float = Field(0.4, ge=0, le=1)
    # BM25's analyser: a language code (miner/language.py lists them) or "auto", detected from a corpus sample.
    language: str = "en"
    dense: bool = True
    # 200, not 100: the false-negative filter drops the candidates with the most evidence of relevance, and on a
    # collection with dozens of relevant passages per query it needs room below them to find hard negatives.
    dense_k: int = Field(200, ge=1, description="dense hits per query")
    # BM25 hits past bm25_k are not candidates but evidence: a dense candidate that BM25 also ranks within this
    # depth carries its BM25 score into the filter's relevance evidence. 0 keeps only the bm25_k hits.
    bm25_evidence_k: int = Field(1000, ge=0, description="BM25 depth read as relevance evidence; 0 off")
    # "auto": exact search (faiss IndexFlatIP) up to `ann_threshold` documents, HNSW above; or "flat", "hnsw",
    # "ivf" on request. An approximate index is cached, and its recall@dense_k against exact search, measured
    # on `ann_recall_queries` sampled queries, is written to the manifest.
    dense_index: DenseIndexKind = _ANN.kind
    ann_threshold: int = Field(_ANN.ann_threshold, ge=1, description="documents above which auto uses HNSW")
    hnsw_m: int = Field(_ANN.hnsw_m, ge=2, description="HNSW neighbours per node")
    hnsw_ef_search: int = Field(_ANN.hnsw_ef_search, ge=1, description="HNSW candidates per query (>= dense_k)")
    ivf_nprobe: int = Field(_ANN.ivf_nprobe, ge=1, description="IVF lists searched per query")
    ann_recall_queries: int = Field(_ANN.recall_queries, ge=0, description="queries to measure recall on; 0 skips")
    rrf_k: int = Field(60, ge=1, description="reciprocal rank fusion constant")

    @field_validator("language")
    @classmethod
    def _supported_language(cls, value: str) -> str:
        code = value.strip().lower()
        if code != AUTO and code not in LANGUAGES:
            raise ValueError(f"unsupported language '{value}' (supported: {supported()}, or {AUTO})")
        return code


# Model settings that change speed, memory or what a run accepts, never which rows it produces.
SPEED_ONLY_MODEL_SETTINGS = frozenset({"batch_size", "teacher_batch_size", "allow_untrained_head", "trust_remote_code"})


class ModelConfig(_Section):
    # A bundled name, a local path, or a hub id (the last only with a network).
    embedding_model: str = "all-MiniLM-L6-v2"
    # When unset, the teacher is the embedding model's cosine similarity.
    cross_encoder: str | None = None
    batch_size: int = Field(64, ge=1)
    # Pairs per cross-encoder call; pairs are sorted by length first, so large batches waste little padding.
    teacher_batch_size: int = Field(128, ge=1)
    # A cross-encoder whose classification head would be initialised at random scores noise: refused unless
    # asked for (tests score with such a model on purpose).
    allow_untrained_head: bool = False
    # A model folder with code of its own (config.json's auto_map) runs that code when it loads: refused unless
    # the user says they trust it.
    trust_remote_code: bool = False
    # Instruction prompts for the embedding model (e5, bge, ...): a prompt text wins over a prompt name (a key of
    # the model's `prompts`); with neither, the model's own "query"/"document" prompt applies, if it has one.
    query_prompt: str | None = None
    query_prompt_name: str | None = None
    document_prompt: str | None = None
    document_prompt_name: str | None = None
    # Both models' weights: `auto` is bfloat16 where the CPU has bf16 units (AMX, AVX512-BF16), else float32.
    precision: RequestedPrecision = "auto"
    # The reduced-precision guard (miner/precision.py): below any floor the run falls back to float32.
    guard_min_cosine: float = Field(0.99, ge=-1, le=1)
    guard_min_overlap: float = Field(0.9, ge=0, le=1)
    guard_min_rank_correlation: float = Field(0.98, ge=-1, le=1)


class FilterConfig(_Section):
    # Defaults chosen with `miner audit` / bench/quality.py: see docs/false-negatives.md, "Why these defaults".
    method: FilterMethod = "none"
    # topk-abs: drop candidates scoring above this ceiling.
    max_score: float = 0.95
    # topk-marginpos: drop candidates scoring above (positive - margin).
    margin: float = Field(0.05, ge=0)
    # topk-percpos: drop candidates scoring above pct x positive (sign-safe).
    pct: float = Field(0.95, gt=0, le=1)
    # With several positives, which of their scores the rule compares against.
    positive_reference: PositiveReference = "min"
    # Rank window over the teacher's ranking: skip the first `range_min`, consider up to rank `range_max`.
    range_min: int = Field(0, ge=0)
    # Past the candidates a query has: the evidence rule, not the window, decides how deep negatives come from.
    range_max: int = Field(10_000, ge=1)
    # Positive expansion: rank each query's candidates by their evidence of relevance, a reciprocal-rank fusion
    # of three rankings (by cosine with the query, by cosine with the nearest positive, weighted
    # `expansion_weight`, and by BM25 score, weighted `lexical_weight`), and drop the top `expansion_depth`:
    # passages that resemble the query, its positives and its words at once are the likeliest unlabelled
    # positives. Never so many that a query is left with fewer than num_negatives candidates. "auto" picks one
    # depth for the whole run: the deepest whose negatives keep a mean query cosine of at least
    # `hardness_target` x that of the reference window (teacher ranks reference_min_rank+1..reference_max_rank,
    # the window sentence-transformers' docs suggest).
    expansion_depth: int | Literal["auto"] = Field("auto", description="auto, or a depth; 0 turns the rule off")
    expansion_weight: float = Field(1.0, ge=0)
    lexical_weight: float = Field(1.0, ge=0)
    hardness_target: float = Field(0.92, gt=0, le=1.5)
    reference_min_rank: int = Field(10, ge=0)
    reference_max_rank: int = Field(50, ge=1)
    # False-negative budget: with queries of two or more positives, hold positives out on them, measure the
    # false-negative rate of each hardness target in HARDNESS_LADDER and use the hardest within this rate.
    max_false_negatives: float | None = Field(None, gt=0, lt=1)
    # Near-duplicates of a positive: drop candidates whose cosine with the nearest positive exceeds this.
    max_positive_similarity: float | None = Field(None, gt=-1, le=1)
    # RocketQA-style denoising: drop candidates the teacher itself scores as relevant (above this score;
    # for a cross-encoder with a sigmoid head, a probability).
    denoise_threshold: float | None = None
    # Retriever agreement: BM25 and dense both ranking a candidate within this depth makes it a likely
    # unlabelled positive. 0 turns the rule off.
    agreement_depth: int = Field(0, ge=0)
    # Coverage fallback: a (query, positive) left short may take candidates beyond range_max, up to
    # `fallback_steps` steps of `fallback_width` ranks, nearest step first. 0 turns it off.
    fallback_steps: int = Field(0, ge=0)
    fallback_width: int = Field(50, ge=1)
    # Floor: drop candidates the teacher scores below this (too easy to teach anything). Off by default.
    min_score: float | None = None
    # Keep the labelled positives (and their copies) among the ranked candidates instead of dropping them: a full
    # ranking for reranking evaluation data, as sentence-transformers' include_positives gives.
    include_positives: bool = False

    @property
    def needs_geometry(self) -> bool:
        """Whether a rule compares candidates with the positives in the embedding space."""
        return self.expansion_depth != 0 or self.max_positive_similarity is not None


class SampleConfig(_Section):
    num_negatives: int = Field(5, ge=1)
    strategy: SamplingStrategy = "top"
    seed: int = 12345
    # SimANS (Zhou et al., 2022): draw with probability ~ exp(-a * (s(q,d) - s(q,d+) - b)^2), favouring
    # candidates scored near the positive rather than above it. `a` is on the teacher's score scale
    # (cosine for the bi-encoder).
    simans_a: float = Field(20.0, gt=0)
    simans_b: float = 0.0


class BatchConfig(_Section):
    # Rows per training batch in the batched formats: every run of `size` rows of those files is one batch.
    size: int | None = None
    # A passage whose cosine with a query's labelled positive reaches this is a near-copy of it, and so answers
    # that query: it may not sit in that query's batch.
    near_copy: float = Field(0.95, gt=0, le=1)
    # Keep the other rows' negatives, not only their positives, from answering a query of the batch: the loss
    # scores every passage of the batch against every query.
    check_negatives: bool = True

    @field_validator("size")
    @classmethod
    def _two_rows_at_least(cls, size: int | None) -> int | None:
        if size is not None and size < 2:
            raise ValueError(
                f"a training batch of {size} row(s) has no in-batch negatives (they are the other rows' passages); "
                "give 2 or more"
            )
        return size


class MineConfig(_Section):
    data: Path
    out: Path
    # qrels split for BEIR folders; None picks `train` if present, else the only split there is.
    split: str | None = None
    # For a pairs-table input: an optional corpus table, and a queries table when pairs use query ids.
    corpus: Path | None = None
    queries: Path | None = None
    # qrels scores at or above this are positives.
    min_relevance: int = 1
    # Skip (and count) qrels rows naming unknown queries or documents instead of refusing the input.
    skip_unknown: bool = False
    # Threads for Lucene, faiss and torch; None uses every core.
    threads: int | None = Field(None, ge=1)
    show_progress: bool = True
    # Content-addressed embedding cache: re-runs encode only texts not seen with the same model.
    cache: bool = True
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # Where the stages run. "local": in this process, nothing to start. "prefect": as tasks of a Prefect flow
    # run, seen in the Prefect UI (a temporary server is started when no API is configured). "auto": prefect
    # when a Prefect API is configured (PREFECT_API_URL) or Dask is asked for, else local.
    engine: Engine = "auto"
    # Dask: an existing scheduler's address (tcp://host:8786), or a local cluster of this many worker processes.
    # The sharded stages (encoding, cross-encoder scoring) then run on its workers.
    dask_address: str | None = None
    workers: int | None = Field(None, ge=1)
    retrieval: RetrievalConfig = RetrievalConfig()
    models: ModelConfig = ModelConfig()
    filter: FilterConfig = FilterConfig()
    sample: SampleConfig = SampleConfig()
    batches: BatchConfig = BatchConfig()
    # Which training files to write. Changes no row, only which files the rows go to.
    formats: list[ExportFormat] = Field(default_factory=lambda: list(DEFAULT_FORMATS))
    # Quality gates ("coverage>=0.95", miner/gates.py): a run that misses one is not published over OUT.
    require: list[str] = Field(default_factory=list)

    @field_validator("data", "out", "corpus", "queries", "cache_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        # Absolute, so that the manifest and a scheduled run mean the same files wherever they run from.
        return path.expanduser().resolve() if path is not None else None

    @field_validator("formats", mode="before")
    @classmethod
    def _known_formats(cls, value: Any) -> Any:
        return normalise_formats(value)

    @field_validator("require", mode="before")
    @classmethod
    def _one_gate_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("require")
    @classmethod
    def _gates_parse(cls, gates: list[str]) -> list[str]:
        # Parsed here, so a malformed gate is refused before any work; written one way (`coverage>=0.95`).
        return [str(parse_gate(gate)) for gate in gates]

    @property
    def dask(self) -> bool:
        return self.dask_address is not None or self.workers is not None

    @property
    def uses_prefect(self) -> bool:
        if self.engine == "auto":
            return self.dask or bool(os.environ.get("PREFECT_API_URL"))
        return self.engine == "prefect"

    @model_validator(mode="after")
    def _dask_runs_through_prefect(self) -> MineConfig:
        if self.dask and self.engine == "local":
            raise ValueError("Dask runs the stages as Prefect tasks; use engine prefect or auto with Dask")
        prompts = self.models.query_prompt, self.models.query_prompt_name, self.models.document_prompt
        if self.dask and any(prompt is not None for prompt in (*prompts, self.models.document_prompt_name)):
            # The Dask workers encode through distributed.prefill_embeddings, which knows no prompts.
            raise ValueError("embedding prompts are not supported with Dask yet; run without dask_address/workers")
        if self.dask_address is not None and self.workers is not None:
            raise ValueError("give either dask_address (an existing cluster) or workers (a local one), not both")
        if self.dask_address is not None and not re.match(r"^(tcp|tls|inproc|ucx)://[^\s]+$", self.dask_address):
            raise ValueError(f"dask_address '{self.dask_address}' is not a scheduler address such as tcp://host:8786")
        return self

    @model_validator(mode="after")
    def _batches_with_batched_formats(self) -> MineConfig:
        batched = [name for name in self.formats if name in BATCHED_FORMATS]
        if batched and self.batches.size is None:
            raise ValueError(f"format {batched[0]} needs a batch size: give batches.size (--batch-size B)")
        if self.batches.size is not None and not batched:
            raise ValueError(
                "batches.size orders only the batched formats, and none is chosen: add --format batched "
                "(batched-triplets, batched-ntuples)"
            )
        return self

    @model_validator(mode="after")
    def _can_produce_negatives(self) -> MineConfig:
        if not (self.retrieval.bm25 or self.retrieval.dense):
            raise ValueError("retrieval.bm25 and retrieval.dense are both off, so there are no candidates")
        window = self.filter.range_max - self.filter.range_min
        if window < self.sample.num_negatives:
            raise ValueError(
                f"the rank window (range_min {self.filter.range_min}, range_max {self.filter.range_max}) holds "
                f"fewer candidates than sample.num_negatives ({self.sample.num_negatives})"
            )
        depth = (self.retrieval.bm25_k if self.retrieval.bm25 else 0) + (
            self.retrieval.dense_k if self.retrieval.dense else 0
        )
        if self.models.cross_encoder is None:
            # The bi-encoder teacher scores cosines, never below -1: a ceiling under that drops everything.
            # A cross-encoder's range is only known once it has scored (checked then, in the filter stage).
            if self.filter.method == "topk-abs" and self.filter.max_score < -1:
                raise ValueError(
                    f"filter.max_score ({self.filter.max_score}) is below every cosine the bi-encoder teacher "
                    "can give (-1 to 1), so no candidate passes"
                )
            if self.filter.denoise_threshold is not None and self.filter.denoise_threshold < -1:
                raise ValueError(
                    f"filter.denoise_threshold ({self.filter.denoise_threshold}) is below every cosine the "
                    "bi-encoder teacher can give (-1 to 1), so every candidate is dropped"
                )
        if self.filter.range_min >= depth:
            raise ValueError(
                f"filter.range_min ({self.filter.range_min}) skips every candidate "
                f"the retrievers return ({depth} at most)"
            )
        return self


# Command-line option name -> dotted config key.
CLI_KEYS: dict[str, str] = {
    "split": "split",
    "corpus": "corpus",
    "queries": "queries",
    "min_relevance": "min_relevance",
    "skip_unknown": "skip_unknown",
    "threads": "threads",
    "engine": "engine",
    "dask_address": "dask_address",
    "workers": "workers",
    "cache": "cache",
    "cache_dir": "cache_dir",
    "bm25": "retrieval.bm25",
    "bm25_k": "retrieval.bm25_k",
    "language": "retrieval.language",
    "dense": "retrieval.dense",
    "dense_k": "retrieval.dense_k",
    "dense_index": "retrieval.dense_index",
    "model": "models.embedding_model",
    "cross_encoder": "models.cross_encoder",
    "encode_batch_size": "models.batch_size",
    "batch_size": "batches.size",
    "allow_untrained_head": "models.allow_untrained_head",
    "precision": "models.precision",
    "trust_remote_code": "models.trust_remote_code",
    "method": "filter.method",
    "max_score": "filter.max_score",
    "margin": "filter.margin",
    "pct": "filter.pct",
    "positive_reference": "filter.positive_reference",
    "range_min": "filter.range_min",
    "range_max": "filter.range_max",
    "expansion_depth": "filter.expansion_depth",
    "expansion_weight": "filter.expansion_weight",
    "lexical_weight": "filter.lexical_weight",
    "hardness_target": "filter.hardness_target",
    "max_false_negatives": "filter.max_false_negatives",
    "bm25_evidence_k": "retrieval.bm25_evidence_k",
    "max_positive_similarity": "filter.max_positive_similarity",
    "denoise_threshold": "filter.denoise_threshold",
    "agreement_depth": "filter.agreement_depth",
    "fallback_steps": "filter.fallback_steps",
    "num_negatives": "sample.num_negatives",
    "sampling": "sample.strategy",
    "seed": "sample.seed",
    "simans_a": "sample.simans_a",
    "simans_b": "sample.simans_b",
    "formats": "formats",
    "require": "require",
}


def normalise_formats(value: Any) -> Any:
    """'triplets,tevatron' / ['all'] / ... -> the chosen formats in one fixed order, negatives always among them.

    negatives.parquet is always written: it is the full record (ids, teacher scores, provenance) every other
    file is cut from, and `miner report` reads it.
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        return value  # not strings: pydantic reports the type
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in {*EXPORT_FORMATS, "all", "batched"}]
    if unknown:
        raise ValueError(f"unknown format '{unknown[0]}' (known: {', '.join(EXPORT_FORMATS)}, batched, or all)")
    chosen = {*names, "negatives"}
    if "all" in names:
        chosen.update(ALL_FORMATS)
    if "batched" in names:
        chosen.update(BATCHED_FORMATS)
    return [name for name in EXPORT_FORMATS if name in chosen]


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


# Dotted config key -> the command-line flag that sets it, so a refusal names what the user typed.
CLI_FLAGS: dict[str, str] = {
    key: "--format" if name == "formats" else f"--{name.replace('_', '-')}" for name, key in CLI_KEYS.items()
}
_FIX = "see `miner mine --help` or examples/mine.toml for the settings and their ranges"


def _section_fields(section: tuple[str, ...]) -> dict[str, Any]:
    """The fields of the config section at `section` (() is the top level), or {} when there is no such section."""
    model: Any = MineConfig
    for part in section:
        field = model.model_fields.get(part)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return {}
    return dict(model.model_fields)


def _sections() -> dict[tuple[str, ...], dict[str, Any]]:
    """Every section of the config (the top level first) and its fields."""
    top = _section_fields(())
    found = {(): top}
    for name, field in top.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found[(name,)] = _section_fields((name,))
    return found


def _unknown_key_fix(loc: tuple[str, ...]) -> str:
    """Where an unknown key belongs, or the known key its name is closest to."""
    *section, leaf = loc
    sections = _sections()
    homes = [place for place, fields in sections.items() if leaf in fields and place != tuple(section)]
    if homes:
        home = homes[0]
        place = f"in [{home[0]}]" if home else "at the top level, before any [section]"
        return f"'{leaf}' belongs {place}: move it there (as {'.'.join((*home, leaf))})"
    close = difflib.get_close_matches(leaf, list(sections.get(tuple(section), {})), n=1, cutoff=0.6)
    if close:
        return f"did you mean {'.'.join((*section, close[0]))}? (examples/mine.toml lists every setting)"
    return _FIX


def setting_range(key: str) -> str:
    """The allowed range of a numeric setting as help text (">= 1", "> 0 and <= 1"), or "" when it has none."""
    *section, leaf = key.split(".")
    field = _section_fields(tuple(section)).get(leaf)
    bounds = []
    for constraint in field.metadata if field is not None else []:
        for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(constraint, name, None) is not None:
                bounds.append(f"{sign} {getattr(constraint, name)}")
    return " and ".join(bounds)


def _line_of_key(path: Path, loc: tuple[str, ...]) -> int | None:
    """Best-effort line of the key at `loc` in a TOML file (inside its [section]), so the error can point at it."""
    *section, leaf = loc
    loc_path = list(loc)
    pattern = re.compile(rf"^\s*{re.escape(leaf)}\s*=")
    current: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        header = re.match(r"^\s*\[([^\[\]]+)\]", line)
        if header:
            current = [part.strip() for part in header.group(1).split(".")]
            if current == loc_path:
                return number  # the key is a section of its own, e.g. a misspelt [filtr]
        elif pattern.match(line) and current == section:
            return number
    return None


def load_config(config_file: Path | None, overrides: dict[str, Any]) -> MineConfig:
    """TOML file (optional) + CLI overrides (dotted keys, None = not given) -> validated config."""
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(config_file, "config file not found", "check the --config path") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise InputError(config_file, f"not valid TOML ({error})", "fix the syntax") from None
        # Paths in a config file are relative to the file, so a config works from any directory.
        for key in ("data", "out", "corpus", "queries", "cache_dir"):
            if isinstance(raw.get(key), str):
                raw[key] = str((config_file.parent / raw[key]).resolve())
    for key, value in overrides.items():
        if value is not None:
            _set_dotted(raw, key, value)
    try:
        return MineConfig.model_validate(raw)
    except ValidationError as error:
        raise _refusal(error, config_file, {key for key, value in overrides.items() if value is not None}) from None


def _refusal(error: ValidationError, config_file: Path | None, given: set[str]) -> InputError:
    """The first validation error as one line: the flag when the command line set it, else the file's line."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    dotted = ".".join(loc)
    from_file = config_file is not None and not any(key == dotted or key.startswith(dotted + ".") for key in given)
    message = first["msg"].removeprefix("Value error, ")
    fix = _FIX
    if first["type"] == "extra_forbidden":
        message, fix = "unknown setting", _unknown_key_fix(loc)
    elif first["type"] == "missing":
        message = "required setting is missing"
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, GateError):
        fix = cause.fix
    if from_file:
        assert config_file is not None
        line = _line_of_key(config_file, loc) if loc else None
        return InputError(config_file, f"{dotted or 'config'}: {message}", fix, line=line)
    if dotted in CLI_FLAGS and dotted in given:
        return InputError(CLI_FLAGS[dotted], message, fix)
    return InputError("command line", f"{dotted or 'config'}: {message}", fix)


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """'name: filter.method=topk-percpos, filter.pct=0.9' -> ('name', {'filter.method': ..., ...})."""
    name, _, assignments = text.partition(":")
    if not name.strip() or not assignments.strip():
        raise InputError("--setting", f"'{text}' is not 'name: key=value, ...'", "name the setting, then its values")
    overrides: dict[str, Any] = {}
    for assignment in assignments.split(","):
        key, equals, raw = assignment.partition("=")
        if not equals or not key.strip():
            raise InputError("--setting", f"'{assignment.strip()}' is not key=value", "write e.g. filter.pct=0.9")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word such as topk-percpos
        overrides[key.strip()] = value
    return name.strip(), overrides
