"""Quality gates: `coverage>=0.95` and kin, checked against a finished run's manifest.

A gate names a metric, a comparison and a number. The metrics are values read from the manifest under
stable names (below), so a gate written today means the same field whatever the manifest's layout becomes.
Parsing happens when the config is validated, so a malformed gate is refused before any work starts; checking
happens once the run's manifest is built, before anything is published.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
SCORE_SERIES = ("positive_score", "negative_score", "margin")
SCORE_STATISTICS = ("mean", "std", "min", "p5", "p25", "p50", "p75", "p95", "max")


class Unavailable(Exception):
    """A metric this run's manifest has no value for (no false-negative estimate, no negatives to describe)."""


def _count(stage: str, name: str) -> Callable[[dict[str, Any]], float]:
    def read(manifest: dict[str, Any]) -> float:
        try:
            return manifest["counts"][stage][name]
        except KeyError:
            raise Unavailable(f"the manifest has no counts.{stage}.{name}") from None

    return read


def _share(
    numerator: Callable[[dict[str, Any]], float], denominator: Callable[[dict[str, Any]], float], what: str
) -> Callable[[dict[str, Any]], float]:
    def read(manifest: dict[str, Any]) -> float:
        total = denominator(manifest)
        if not total:
            raise Unavailable(f"no {what} to divide by")
        return numerator(manifest) / total

    return read


def _estimate(field: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], float]:
    def read(manifest: dict[str, Any]) -> float:
        estimate = manifest.get("false_negatives_estimate") or {}
        if estimate.get("rate") is None:
            why = str(estimate.get("method") or "the run made no estimate").removeprefix("none: ").split(";")[0]
            raise Unavailable(f"not estimated: {why}")
        return field(estimate)

    return read


def _score(series: str, statistic: str) -> Callable[[dict[str, Any]], float]:
    def read(manifest: dict[str, Any]) -> float:
        value = (manifest.get("scores") or {}).get(series, {}).get(statistic)
        if value is None:
            raise Unavailable(f"no {series} to describe (the run exported no negatives)")
        return value

    return read


_pairs = _count("sample", "pairs")
# Metric name -> (how it is read from a manifest, what it means). The names are documented in docs/settings.md.
METRICS: dict[str, tuple[Callable[[dict[str, Any]], float], str]] = {
    "coverage": (
        _share(_count("sample", "pairs_full"), _pairs, "(query, positive) pairs"),
        "share of (query, positive) pairs that got all sample.num_negatives negatives",
    ),
    "documents": (_count("ingest", "documents"), "documents read"),
    "queries": (_count("ingest", "queries_with_positives"), "queries with a positive"),
    "pairs": (_pairs, "(query, positive) pairs"),
    "negatives": (_count("sample", "negatives"), "negatives mined (rows of negatives.parquet)"),
    "negatives_per_pair": (
        _share(_count("sample", "negatives"), _pairs, "(query, positive) pairs"),
        "negatives per (query, positive) pair",
    ),
    "pairs_without_negatives": (_count("sample", "pairs_without_negatives"), "pairs that got no negative"),
    "false_negative_rate": (_estimate(lambda e: e["rate"]), "estimated false-negative rate (held-out positives)"),
    "false_negative_rate_high": (
        _estimate(lambda e: e["ci95"][1]),
        "upper end of the estimated false-negative rate's 95% interval",
    ),
    **{
        f"{series}_{statistic}": (_score(series, statistic), f"{statistic} of the exported {series.replace('_', ' ')}")
        for series in SCORE_SERIES
        for statistic in SCORE_STATISTICS
    },
}
METRIC_LIST = (
    ", ".join(name for name in METRICS if not name.startswith(SCORE_SERIES))
    + f", and {{{'|'.join(SCORE_SERIES)}}}_{{{'|'.join(SCORE_STATISTICS)}}}"
)
_GATE = re.compile(r"\s*([A-Za-z0-9_]+)\s*(>=|<=|==|>|<)\s*(\S+)\s*")


class GateError(ValueError):
    """A gate that does not parse, or names no metric; `fix` says what to write instead."""

    def __init__(self, problem: str, fix: str) -> None:
        self.fix = fix
        super().__init__(problem)


@dataclass(frozen=True)
class Gate:
    metric: str
    operator: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.operator}{self.threshold:g}"


def parse_gate(text: str) -> Gate:
    match = _GATE.fullmatch(text)
    if match is None:
        raise GateError(
            f"'{text}' is not <metric><op><number>",
            f"write e.g. coverage>=0.95 (operators {', '.join(OPERATORS)}; metrics: {METRIC_LIST})",
        )
    metric, op, number = match.groups()
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, list(METRICS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise GateError(f"unknown metric '{metric}' in '{text.strip()}'", f"{hint}metrics: {METRIC_LIST}")
    try:
        threshold = float(number)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise GateError(f"'{number}' in '{text.strip()}' is not a number", "write a finite number, e.g. 0.95 or 1e6")
    return Gate(metric, op, threshold)


def metric_value(manifest: dict[str, Any], metric: str) -> float:
    """The metric's value in this manifest; `Unavailable` (with the reason) when it has none."""
    read, _ = METRICS[metric]
    value = read(manifest)
    return value if isinstance(value, int) else round(float(value), 6)


def check_gates(texts: list[str], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each gate's outcome: the gate, the measured value (None when unavailable), whether it passed, and a
    one-line reason when it did not. An unavailable metric fails its gate: a promise that cannot be checked is
    not kept."""
    results = []
    for text in texts:
        gate = parse_gate(text)
        try:
            value: float | None = metric_value(manifest, gate.metric)
        except Unavailable as missing:
            results.append({"gate": str(gate), "value": None, "passed": False, "reason": f"{gate.metric} {missing}"})
            continue
        assert value is not None
        passed = OPERATORS[gate.operator](value, gate.threshold)
        reason = None if passed else f"{gate.metric} is {value:g}, not {gate.operator} {gate.threshold:g}"
        results.append({"gate": str(gate), "value": value, "passed": passed, "reason": reason})
    return results


def failed_reasons(results: list[dict[str, Any]]) -> list[str]:
    return [result["reason"] for result in results if not result["passed"]]
