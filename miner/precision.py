"""Which floating-point precision the models run at, and the check that reduced precision kept their answers.

bfloat16 halves the bytes every matrix product moves and, on CPUs with bf16 units (AVX512-BF16, AMX), runs
the products natively: encoding took about half the time of float32 on both kinds of machine measured
(bench/results/speed.md). Elsewhere the same arithmetic is emulated and gains nothing, so `auto` asks the CPU.

The guard re-computes a small, fixed sample of a run's texts (or text pairs) at float32 before the run
commits to bfloat16, and compares. It is the run's own evidence, on its own texts, that nothing drifted; a
model that does not survive the cast (large activations, a custom head) falls back to float32 with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from miner.config import Precision

# CPU features that execute bfloat16 products in hardware, as torch names them.
BF16_UNITS = ("amx_bf16", "avx512_bf16")

# The guard's sample: this share of the texts (or pairs) the run must compute, within these bounds. Re-computing
# 2% at float32 and at bfloat16 costs about 2 x 2% x 1.5 = 6% of the encoding at bfloat16 in the worst case of
# a small collection, and nothing worth counting on a large one.
GUARD_SHARE = 0.02
GUARD_MIN = 32
GUARD_MAX = 256
# Documents each sample query's ranking is compared over: its top OVERLAP_DEPTH, or half the sampled documents.
OVERLAP_DEPTH = 100


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run asked for, what it will use, and why: recorded in the manifest."""

    requested: str
    precision: Precision
    reason: str


def cpu_capabilities() -> dict[str, Any]:
    """The CPU's name and bf16 flags: from /proc/cpuinfo where there is one (reading it costs nothing, while
    importing torch costs a second a warm run otherwise never pays), else from torch's own check."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields = dict(
        (key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in text.splitlines()) if value
    )
    if "flags" in fields:
        flags = set(fields["flags"].split())
        return {"cpu_name": fields.get("model name", ""), **{unit: unit in flags for unit in BF16_UNITS}}
    import torch

    return dict(torch.cpu.get_capabilities())


def bf16_units(capabilities: dict[str, Any]) -> list[str]:
    return [name for name in BF16_UNITS if capabilities.get(name)]


def choose_precision(requested: str, capabilities: dict[str, Any] | None = None) -> PrecisionChoice:
    """`auto` -> bfloat16 where the CPU has bf16 units, float32 elsewhere; a forced precision as given."""
    if requested in ("float32", "bfloat16"):
        return PrecisionChoice(requested, requested, "asked for")  # type: ignore[arg-type]
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    name = str(capabilities.get("cpu_name") or "this CPU")
    units = bf16_units(capabilities)
    if units:
        return PrecisionChoice(requested, "bfloat16", f"{name} has {' and '.join(units)}")
    return PrecisionChoice(requested, "float32", f"{name} has no bf16 units (neither of {', '.join(BF16_UNITS)})")


def sample_size(count: int) -> int:
    """How many of `count` texts (or pairs) the guard re-computes."""
    return min(count, max(GUARD_MIN, min(GUARD_MAX, math.ceil(GUARD_SHARE * count))))


@dataclass(frozen=True)
class GuardFloor:
    """What reduced precision must keep; below any of these the run falls back to float32."""

    min_cosine: float  # of each sampled text's vector to its float32 vector
    min_overlap: float  # mean share of each sampled query's top documents kept
    min_rank_correlation: float  # Spearman, of a cross-encoder's scores on the sampled pairs


def vector_agreement(
    query_reduced: np.ndarray,
    query_full: np.ndarray,
    doc_reduced: np.ndarray,
    doc_full: np.ndarray,
    floor: GuardFloor,
) -> dict[str, Any]:
    """Cosines of reduced to float32 vectors, and how much of each sampled query's ranking of the sampled
    documents survives: both sides of the product carry the rounding, as in the run itself."""
    cosines = np.concatenate([_row_cosines(query_reduced, query_full), _row_cosines(doc_reduced, doc_full)])
    depth = min(OVERLAP_DEPTH, max(1, len(doc_full) // 2))
    overlap = _top_overlap(query_reduced @ doc_reduced.T, query_full @ doc_full.T, depth) if len(doc_full) else 1.0
    figures = {
        "texts": len(cosines),
        "min_cosine": round(float(cosines.min()), 6) if len(cosines) else 1.0,
        "mean_cosine": round(float(cosines.mean()), 6) if len(cosines) else 1.0,
        "overlap_depth": depth,
        "mean_overlap": round(float(overlap), 4),
    }
    failed = []
    if figures["min_cosine"] < floor.min_cosine:
        failed.append(f"a vector's cosine to float32 is {figures['min_cosine']} < {floor.min_cosine}")
    if figures["mean_overlap"] < floor.min_overlap:
        failed.append(f"top-{depth} overlap is {figures['mean_overlap']} < {floor.min_overlap}")
    return {**figures, "passed": not failed, "failed": "; ".join(failed)}


def score_agreement(reduced: np.ndarray, full: np.ndarray, floor: GuardFloor) -> dict[str, Any]:
    """Spearman correlation of a cross-encoder's reduced and float32 scores on the sampled pairs: negatives are
    chosen by rank, so the ranks are what must hold."""
    correlation = _spearman(reduced, full)
    spread = float(np.std(full)) or 1.0
    figures = {
        "pairs": len(full),
        "rank_correlation": round(correlation, 6),
        "max_abs_difference_in_sd": round(float(np.max(np.abs(reduced - full))) / spread, 4) if len(full) else 0.0,
    }
    failed = (
        ""
        if correlation >= floor.min_rank_correlation
        else (f"rank correlation to float32 is {figures['rank_correlation']} < {floor.min_rank_correlation}")
    )
    return {**figures, "passed": not failed, "failed": failed}


def _row_cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    return np.einsum("ij,ij->i", left, right) / np.where(norms > 0, norms, 1.0)


def _top_overlap(reduced: np.ndarray, full: np.ndarray, depth: int) -> float:
    top_reduced = np.argsort(-reduced, axis=1, kind="stable")[:, :depth]
    top_full = np.argsort(-full, axis=1, kind="stable")[:, :depth]
    shares = [len(np.intersect1d(a, b)) / depth for a, b in zip(top_reduced, top_full, strict=True)]
    return float(np.mean(shares)) if shares else 1.0


def _spearman(left: np.ndarray, right: np.ndarray) -> float:
    if len(left) < 2:
        return 1.0
    left_ranks = np.argsort(np.argsort(left, kind="stable"), kind="stable").astype(np.float64)
    right_ranks = np.argsort(np.argsort(right, kind="stable"), kind="stable").astype(np.float64)
    if left_ranks.std() == 0 or right_ranks.std() == 0:
        return 1.0
    return float(np.corrcoef(left_ranks, right_ranks)[0, 1])
