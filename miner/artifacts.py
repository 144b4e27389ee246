"""What a flow run shows in the Prefect UI, built from its manifest: plain data, published by `flows/mine.py`.

A nightly job is read in the UI, not in a terminal. Each run publishes three artifacts under keys derived from
its deployment's name (the flow's name outside a deployment), so the UI lists one run after another:

- `<name>-summary`: a table of the run's counts, coverage, score statistics, estimated false-negative rate and,
  when gates are set, each gate's outcome;
- `<name>-report`: a link to the run's HTML report (`miner report`'s page);
- `<name>-change`: the change against the previous run published to the same output folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from miner.export import MANIFEST_FILE
from miner.gates import METRICS, SCORE_SERIES, Unavailable, metric_value

# The metrics the summary table shows, in its order: the gates' names, so a gate reads as the row it checks.
SUMMARY_METRICS = (
    "documents",
    "queries",
    "pairs",
    "negatives",
    "negatives_per_pair",
    "coverage",
    "pairs_without_negatives",
    "false_negative_rate",
    "false_negative_rate_high",
    *(f"{series}_{stat}" for series in SCORE_SERIES for stat in ("mean", "p5", "p50", "p95")),
)
# Counts compared with the previous run.
CHANGE_METRICS = ("documents", "queries", "pairs", "negatives")


def artifact_key(name: str, kind: str) -> str:
    """`Nightly_v2`, "summary" -> `nightly-v2-summary`: Prefect keys take lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "mine"
    return f"{slug}-{kind}"


def published_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the run last published to `out`, or None when there is none (or it cannot be read): read
    before a run starts, it is that run's "previous run"."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _value(manifest: dict[str, Any], metric: str) -> tuple[float | None, str]:
    """(value, why it is missing); a missing value is None with its reason."""
    try:
        return metric_value(manifest, metric), ""
    except Unavailable as missing:
        return None, str(missing)


def summary_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary table: one row per metric (value, and what it means or why it is missing), then the gates."""
    written_to = manifest.get("written_to") or manifest["config"]["out"]
    gates = manifest.get("gates") or []
    published = all(gate["passed"] for gate in gates)
    rows: list[dict[str, Any]] = [
        {"metric": "run_id", "value": manifest["run_id"], "note": f"created {manifest.get('created')}"},
        {
            "metric": "outputs",
            "value": written_to,
            "note": "published" if published else "kept aside: a quality gate failed",
        },
    ]
    for metric in SUMMARY_METRICS:
        value, missing = _value(manifest, metric)
        note = missing or METRICS[metric][1]
        if metric == "false_negative_rate" and value is not None:
            low, high = manifest["false_negatives_estimate"]["ci95"]
            note = f"{note}; 95% interval {low:g} to {high:g}"
        rows.append({"metric": metric, "value": value, "note": note})
    for gate in gates:
        outcome = "passed" if gate["passed"] else f"FAILED: {gate['reason']}"
        rows.append({"metric": f"gate {gate['gate']}", "value": gate["value"], "note": outcome})
    return rows


def run_change(manifest: dict[str, Any], previous: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """Per count: the previous run's value, this run's, and the change; None when there is no previous run."""
    if previous is None:
        return None
    rows = []
    for metric in CHANGE_METRICS:
        now, _ = _value(manifest, metric)
        before, _ = _value(previous, metric)
        change = None if now is None or before is None else round(now - before, 6)
        rows.append({"count": metric, "previous": before, "this_run": now, "change": change})
    return rows


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    shown = f"{int(value):,}" if float(value).is_integer() else f"{value:,.4g}"
    return f"+{shown}" if signed and value > 0 else shown


def change_markdown(manifest: dict[str, Any], previous: dict[str, Any] | None) -> str:
    rows = run_change(manifest, previous)
    if rows is None or previous is None:
        return (
            f"**No previous run**: `{manifest['config']['out']}` held no published run before run "
            f"`{manifest['run_id']}`."
        )
    lines = [
        f"Run `{manifest['run_id']}` against the previous run published to `{manifest['config']['out']}` "
        f"(`{previous.get('run_id')}`, created {previous.get('created')}):",
        "",
        "| count | previous run | this run | change |",
        "|---|---:|---:|---:|",
        *(
            f"| {row['count']} | {_number(row['previous'])} | {_number(row['this_run'])} | "
            f"{_number(row['change'], signed=True)} |"
            for row in rows
        ),
    ]
    return "\n".join(lines) + "\n"


def report_link(report: Path) -> str:
    """A file:// URL of the report page: the UI opens it on the machine that holds the output folder."""
    return report.resolve().as_uri()
