"""The output folder as a dataset: `README.md` is a Hugging Face dataset card naming each exported file.

Its YAML `configs:` block gives every file a config name, so `datasets.load_dataset(str(OUT), "triplets")`
loads that file and nothing else (the folder also holds the manifest and other formats). The text below it says
how the data was mined, in numbers taken from the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miner import export, formats
from miner.atomic import atomic_write

CARD_FILE = "README.md"


def _config_names() -> dict[str, str]:
    """Parquet file name -> config name: each Parquet format by its own file, each JSONL one by its twin."""
    names = {formats.DATASET_TWINS.get(file_name, file_name): name for name, file_name in formats.FILES.items()}
    return {file_name: name for file_name, name in names.items() if file_name.endswith(".parquet")}


def _configs(files: list[str]) -> list[str]:
    names = _config_names()
    lines = ["configs:"]
    for file_name in files:
        # `datasets` picks one builder for a whole folder: Parquet here, so a JSONL format's config names its twin.
        if file_name not in names:
            continue
        # JSON-quoted, so a name is valid YAML whatever it holds.
        lines += [
            f"- config_name: {json.dumps(names[file_name])}",
            *(["  default: true"] if names[file_name] == "negatives" else []),
            "  data_files:",
            "  - split: train",
            f"    path: {json.dumps(file_name)}",
        ]
    return lines


def _summary(manifest: dict[str, Any]) -> list[str]:
    config = manifest.get("config", {})
    counts = manifest.get("counts", {})
    sample = counts.get("sample", {})
    ingest = counts.get("ingest", {})
    retrieval = config.get("retrieval", {})
    retrievers = [name for name, on in (("BM25", retrieval.get("bm25")), ("dense", retrieval.get("dense"))) if on]
    filter_settings = config.get("filter", {})
    estimate = manifest.get("false_negatives_estimate") or {}
    rate = estimate.get("rate") if isinstance(estimate, dict) else None
    method = estimate.get("method", "see the manifest") if isinstance(estimate, dict) else "see the manifest"
    rate_text = f"{rate:.4f}" if isinstance(rate, int | float) else f"not measured ({method})"
    # The depth the data chose ("auto"), else the one configured.
    depth = manifest.get("filter_choice", {}).get("expansion", {}).get("expansion_depth")
    depth = filter_settings.get("expansion_depth", "?") if depth is None else depth
    lines = [
        "## How it was mined",
        "",
        f"- Mined by hardneg-miner {manifest.get('packages', {}).get('hardneg-miner', '?')} "
        f"on {manifest.get('created', '?')}.",
        f"- Input: {ingest.get('queries_with_positives', '?')} queries with {ingest.get('positives', '?')} "
        f"positives, {ingest.get('documents', '?')} documents.",
        f"- Candidates: {' + '.join(retrievers) or 'none'} retrieval "
        f"with `{config.get('models', {}).get('embedding_model', '?')}`; teacher: `{manifest.get('teacher', '?')}`.",
        f"- Filter: method `{filter_settings.get('method', '?')}`, evidence cut depth {depth}; candidates per "
        "verdict: " + ", ".join(f"{rule} {n}" for rule, n in counts.get("filter", {}).items() if n) + ".",
        f"- Sampling: `{config.get('sample', {}).get('strategy', '?')}`, "
        f"{config.get('sample', {}).get('num_negatives', '?')} negatives per (query, positive); "
        f"{sample.get('negatives', '?')} negatives for {sample.get('pairs', '?')} pairs "
        f"({sample.get('pairs_short', '?')} short, {sample.get('pairs_without_negatives', '?')} without any).",
        f"- Estimated false-negative rate: {rate_text}.",
        "",
        f"Everything else (settings, model fingerprints, input checksums, timings) is in `{export.MANIFEST_FILE}`.",
    ]
    return lines


def _jsonl_lines(files: list[str]) -> list[str]:
    jsonl = [file for file in files if file.endswith(".jsonl")]
    if not jsonl:
        return []
    names = _config_names()
    return [
        "Files for other trainers' own readers, one JSON object per line. A dataset folder has one file format,",
        "so each also has a Parquet copy with the same rows, which its config name loads:",
        "",
        *[
            f"- `{file}` (config `{names[formats.DATASET_TWINS[file]]}`: `{formats.DATASET_TWINS[file]}`)"
            for file in jsonl
        ],
        "",
    ]


def dataset_card(manifest: dict[str, Any]) -> str:
    """The card's text: YAML front matter with one config per exported file, then the mining summary."""
    known = {*formats.FILES.values(), *formats.DATASET_TWINS.values()}
    files = [name for name in manifest.get("files", []) if name in known]
    lines = [
        "---",
        *_configs(files),
        "---",
        "",
        "# Hard negatives mined by hardneg-miner",
        "",
        'Load one file by its config name, e.g. `datasets.load_dataset("path/to/this/folder", "triplets")`:',
        "",
        *[f"- `{name}`: `{file}`" for file, name in _config_names().items() if file in files],
        "",
        *_jsonl_lines(files),
        *_summary(manifest),
    ]
    return "\n".join(lines) + "\n"


def write_card(manifest: dict[str, Any], out: Path, scratch: Path | None = None) -> None:
    with atomic_write(out / CARD_FILE, scratch) as temporary:
        temporary.write_text(dataset_card(manifest), encoding="utf-8")
