"""What a scheduled run shows and what stops it: Prefect artifacts read back from a real server, quality gates
that keep a failing run's outputs aside, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from conftest import read_artifacts, refused, run_cli

from miner.artifacts import CHANGE_METRICS, artifact_key
from miner.errors import GATE_FAILED_EXIT

FLOW = "mine-hard-negatives"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(prefect_server: str, tiny_beir: Path, small_beir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three flow runs into one OUT: a good run on 5 queries, a good run on 20, then one that misses a gate."""
    out = tmp_path_factory.mktemp("gates") / "out"
    common = ["--out", out, "-q", "--require", "coverage>=0.5", "--require", "negatives>=1"]
    code, _, stderr = run_cli("mine", tiny_beir, *common, "--num-negatives", "3")
    assert code == 0, stderr
    first = _manifest(out)
    code, _, stderr = run_cli("mine", small_beir, *common, "--num-negatives", "4")
    assert code == 0, stderr
    second = _manifest(out)
    published = _snapshot(out)
    code, stdout, stderr = run_cli("mine", small_beir, "--out", out, "-q", "--require", "pairs>=1e9")
    return {
        "out": out,
        "first": first,
        "second": second,
        "published": published,
        "failed": (code, stdout, stderr),
    }


def _artifacts(kind: str) -> list[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return read_artifacts(client, artifact_key(FLOW, kind))


def _run_artifacts(run_id: str) -> dict[str, Any]:
    """The summary table (as rows), report link and change markdown one flow run published, found by its run id."""
    tables = [(a, json.loads(a.data)) for a in _artifacts("summary")]
    ((summary, rows),) = [(a, rows) for a, rows in tables if rows[0]["value"] == run_id]
    (link,) = [a for a in _artifacts("report") if a.flow_run_id == summary.flow_run_id]
    (change,) = [a for a in _artifacts("change") if a.flow_run_id == summary.flow_run_id]
    return {
        "rows": {row["metric"]: row for row in rows},
        "link": link,
        "change": change.data,
        "flow_run": summary.flow_run_id,
    }


def test_summary_table_holds_the_manifest_values(runs: dict) -> None:
    manifest = runs["second"]
    rows = _run_artifacts(manifest["run_id"])["rows"]
    sample, scores = manifest["counts"]["sample"], manifest["scores"]
    assert rows["documents"]["value"] == manifest["counts"]["ingest"]["documents"]
    assert rows["queries"]["value"] == manifest["counts"]["ingest"]["queries_with_positives"]
    assert rows["pairs"]["value"] == sample["pairs"] > 0
    assert rows["negatives"]["value"] == sample["negatives"] > 0
    assert rows["coverage"]["value"] == round(sample["pairs_full"] / sample["pairs"], 6)
    assert rows["negatives_per_pair"]["value"] == round(sample["negatives"] / sample["pairs"], 6)
    for series in ("positive_score", "negative_score", "margin"):
        for statistic in ("mean", "p5", "p50", "p95"):
            assert rows[f"{series}_{statistic}"]["value"] == scores[series][statistic]
    estimate = manifest["false_negatives_estimate"]
    assert rows["false_negative_rate"]["value"] == estimate["rate"] is not None
    assert rows["false_negative_rate_high"]["value"] == estimate["ci95"][1]
    assert (rows["outputs"]["value"], rows["outputs"]["note"]) == (str(runs["out"]), "published")
    assert rows["gate coverage>=0.5"]["note"] == "passed"


def test_a_run_without_an_estimate_says_why(runs: dict) -> None:
    # Five queries: too few with two positives to hold any out.
    rows = _run_artifacts(runs["first"]["run_id"])["rows"]
    assert rows["false_negative_rate"]["value"] is None
    assert rows["false_negative_rate"]["note"].startswith("not estimated: fewer than 10 queries")


def test_report_link_points_at_the_runs_report(runs: dict) -> None:
    manifest = runs["second"]
    link = _run_artifacts(manifest["run_id"])["link"]
    report = Path(unquote(urlparse(link.data.split("](")[1].removesuffix(")")).path))
    assert report.is_file() and report.name == "index.html"
    assert manifest["run_id"] in report.read_text()
    # Beside OUT, not in it: OUT holds exactly the files its manifest lists.
    assert sorted(runs["published"]) == sorted(manifest["files"])


def test_change_artifact_gives_the_deltas_of_the_two_manifests(runs: dict) -> None:
    first, second = runs["first"], runs["second"]
    change = _run_artifacts(second["run_id"])["change"]
    for metric, (stage, name) in zip(
        CHANGE_METRICS,
        [("ingest", "documents"), ("ingest", "queries_with_positives"), ("sample", "pairs"), ("sample", "negatives")],
        strict=True,
    ):
        before, now = first["counts"][stage][name], second["counts"][stage][name]
        assert now != before, metric
        assert f"| {metric} | {before:,} | {now:,} | {now - before:+,} |" in change, change
    assert "No previous run" in _run_artifacts(first["run_id"])["change"]


def test_a_failed_gate_fails_the_flow_run_and_keeps_the_last_good_outputs(runs: dict) -> None:
    from prefect.client.orchestration import get_client

    code, stdout, stderr = runs["failed"]
    assert code == GATE_FAILED_EXIT, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: quality gate failed: pairs is ") and "not >= 1e+09" in line, line
    assert "Traceback" not in stdout + stderr
    out = runs["out"]
    assert _snapshot(out) == runs["published"]
    (rejected,) = (out.parent / f"{out.name}.rejected").iterdir()
    kept = _manifest(rejected)
    assert sorted(p.name for p in rejected.iterdir()) == sorted(kept["files"])
    (gate,) = kept["gates"]
    assert (gate["gate"], gate["value"], gate["passed"]) == ("pairs>=1e+09", kept["counts"]["sample"]["pairs"], False)
    assert f"quality gate failed: {gate['reason']}; this run's outputs are kept aside in {rejected}" in line
    artifacts = _run_artifacts(kept["run_id"])
    assert artifacts["rows"]["outputs"]["value"] == str(rejected)
    assert artifacts["rows"]["gate pairs>=1e+09"]["note"].startswith("FAILED: pairs is ")
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(artifacts["flow_run"]).state
    assert state.is_failed() and state.message == line.removeprefix("error: ")


def test_a_failed_gate_from_the_command_line_in_process(tiny_beir: Path, tmp_path: Path) -> None:
    """No Prefect: the same gate, the same exit code and line; nothing published, the outputs kept aside."""
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        "mine", tiny_beir, "--out", out, "-q", "--engine", "local", "--require", "false_negative_rate<=0.05"
    )
    assert code == GATE_FAILED_EXIT, stderr
    assert stderr.startswith("error: quality gate failed: false_negative_rate not estimated: fewer than 10")
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    (rejected,) = (tmp_path / "out.rejected").iterdir()
    assert (rejected / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ("coverge>=0.95", "error: --require: unknown metric 'coverge' in 'coverge>=0.95'; did you mean coverage? "),
        ("coverage=>0.95", "error: --require: 'coverage=>0.95' is not <metric><op><number>; write e.g. coverage>="),
        ("coverage>=high", "error: --require: 'high' in 'coverage>=high' is not a number"),
    ],
)
def test_a_malformed_gate_is_refused_before_any_work(gate: str, message: str, tiny_beir: Path, tmp_path: Path) -> None:
    line = refused(("mine", tiny_beir, "--out", tmp_path / "out", "--require", gate), message, tmp_path / "out")
    assert "negatives_per_pair" in line or "number" in line


def test_a_malformed_gate_in_the_config_file_names_its_line(tiny_beir: Path, tmp_path: Path) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(f'data = "{tiny_beir}"\nout = "out"\nrequire = ["coverage>=0.9", "recall>=0.5"]\n')
    refused(
        ("mine", "--config", config),
        f"error: {config}:3: require: unknown metric 'recall' in 'recall>=0.5'; metrics: coverage, documents",
        tmp_path / "out",
    )


def test_a_scheduled_run_that_misses_a_gate_fails_with_the_same_line(
    prefect_server: str, tiny_beir: Path, tmp_path: Path
) -> None:
    """The deployments' flow runs the mining flow as a subflow: its own state carries the gate's line, not
    Prefect's count of failed subflows."""
    from flows.mine import mine_flow_from_settings
    from miner.config import load_config

    out = tmp_path / "out"
    config = load_config(None, {"data": tiny_beir, "out": out, "show_progress": False, "require": ["queries>5"]})
    state = mine_flow_from_settings(config.model_dump(mode="json"), return_state=True)
    assert state.is_failed()
    (rejected,) = (tmp_path / "out.rejected").iterdir()
    assert state.message == (
        f"quality gate failed: queries is 5, not > 5; this run's outputs are kept aside in {rejected}, and {out} "
        "still holds the last published run"
    )
    assert not out.exists()
