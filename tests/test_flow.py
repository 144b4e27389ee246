"""The whole flow through the CLI: real Lucene, faiss, sentence-transformers and a real Prefect server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import miner_process, run_cli

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def mined(small_beir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    code, _, stderr = run_cli(
        "mine",
        small_beir,
        "--out",
        out,
        "--quiet",
        "--method",
        "topk-marginpos",
        "--margin",
        "0.05",
        "--num-negatives",
        "4",
    )
    assert code == 0, stderr
    return out


def test_outputs_and_manifest_agree(mined: Path, small_beir: Path) -> None:
    names = sorted(p.name for p in mined.iterdir())
    assert names == ["README.md", "manifest.json", "negatives.parquet", "ntuples.parquet", "triplets.parquet"]
    manifest = json.loads((mined / "manifest.json").read_text())
    negatives = pl.read_parquet(mined / "negatives.parquet")
    counts = manifest["counts"]
    assert negatives.height == counts["sample"]["negatives"] == counts["export"]["negatives.parquet"] > 0
    assert counts["sample"]["pairs"] == counts["ingest"]["positives"]
    assert sum(counts["filter"].values()) == counts["candidates"]["pool"]
    assert counts["candidates"]["pool"] == sum(counts["candidates"][f"source_{s}"] for s in ("bm25", "dense", "both"))
    assert manifest["config"]["sample"]["num_negatives"] == 4
    assert manifest["models"]["embedding"]["origin"] == "bundled"
    assert set(manifest["timings_s"]) >= {"ingest", "bm25", "embed", "teacher", "filter", "sample"}
    assert manifest["packages"]["pyserini"] == "1.6.0"
    assert manifest["scores"]["negative_score"]["count"] == negatives.height


def test_no_negative_is_a_positive_or_a_copy_of_one(mined: Path, small_beir: Path) -> None:
    negatives = pl.read_parquet(mined / "negatives.parquet")
    qrels = pl.read_csv(
        small_beir / "qrels" / "test.tsv",
        separator="\t",
        schema_overrides={"query-id": pl.String, "corpus-id": pl.String},
    )
    positives = qrels.filter(pl.col("score") >= 1).select(query_id="query-id", negative_id="corpus-id")
    assert negatives.join(positives, on=["query_id", "negative_id"], how="semi").height == 0
    assert (negatives["negative"] != negatives["positive"]).all()
    # The marginpos rule held: every negative scores at least `margin` below the query's weakest positive.
    weakest = negatives.group_by("query_id").agg(pl.col("positive_score").min().alias("weakest"))
    checked = negatives.join(weakest, on="query_id")
    assert (checked["negative_score"] <= checked["weakest"] - 0.05 + 1e-6).all()
    assert negatives.group_by("query_id", "positive_id").len()["len"].max() <= 4
    assert set(negatives["source"]) <= {"bm25", "dense", "both"}


def test_training_shapes(mined: Path) -> None:
    triplets = pq.read_table(mined / "triplets.parquet")
    assert triplets.column_names == ["anchor", "positive", "negative"]
    ntuples = pl.read_parquet(mined / "ntuples.parquet")
    assert ntuples.columns == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4"]
    assert ntuples.null_count().sum_horizontal()[0] == 0


def test_huggingface_datasets_loads_the_exports(mined: Path) -> None:
    from datasets import load_dataset

    triplets = load_dataset("parquet", data_files=str(mined / "triplets.parquet"), split="train")
    assert triplets.column_names == ["anchor", "positive", "negative"]
    assert len(triplets) == pq.read_metadata(mined / "triplets.parquet").num_rows
    ntuples = load_dataset("parquet", data_files=str(mined / "ntuples.parquet"), split="train")
    assert "negative_4" in ntuples.column_names


def test_inspect_prints_counts(mined: Path) -> None:
    code, stdout, _ = run_cli("inspect", mined)
    assert code == 0
    assert "pairs_without_negatives" in stdout and "negative_score" in stdout
    code, stdout, _ = run_cli("inspect", mined, "--json")
    assert json.loads(stdout)["counts"]["sample"]["negatives"] > 0


def test_cross_encoder_teacher_with_bm25_only(small_beir: Path, tiny_cross_encoder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ce"
    code, _, stderr = run_cli(
        "mine",
        small_beir,
        "--out",
        out,
        "-q",
        "--no-dense",
        "--cross-encoder",
        tiny_cross_encoder,
        "--method",
        "none",
        "--expansion-depth",
        "0",
        "--sampling",
        "random",
        "--seed",
        "3",
    )
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"].startswith("cross-encoder:")
    assert manifest["models"]["teacher"]["origin"] == "local"
    assert "embed" not in manifest["timings_s"]  # neither retrieval nor the teacher needed the bi-encoder
    negatives = pl.read_parquet(out / "negatives.parquet")
    assert set(negatives["source"]) == {"bm25"}
    assert manifest["counts"]["sample"]["pairs_full"] == manifest["counts"]["sample"]["pairs"]


def test_dense_only_and_bi_encoder_teacher_without_dense(small_beir: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli("mine", small_beir, "--out", tmp_path / "dense", "-q", "--no-bm25")
    assert code == 0, stderr
    assert set(pl.read_parquet(tmp_path / "dense" / "negatives.parquet")["source"]) == {"dense"}
    code, _, stderr = run_cli("mine", small_beir, "--out", tmp_path / "bm25", "-q", "--no-dense", "--method", "none")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "bm25" / "manifest.json").read_text())
    assert manifest["teacher"] == "bi-encoder:all-MiniLM-L6-v2" and "embed" in manifest["timings_s"]


def test_config_file_with_overrides(small_beir: Path, tmp_path: Path) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(f'data = "{small_beir}"\nout = "out"\n[sample]\nnum_negatives = 2\n[filter]\nmethod = "none"\n')
    code, _, stderr = run_cli("mine", "--config", config, "-q", "--num-negatives", "3")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["sample"]["num_negatives"] == 3 and manifest["config"]["filter"]["method"] == "none"


def test_bad_row_inside_the_flow_is_one_line_and_writes_nothing(small_beir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (folder / name).write_text((small_beir / name).read_text())
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\tnope\t2\n")
    code, _, stderr = run_cli("mine", folder, "--out", tmp_path / "out", "-q")
    assert code == 2
    assert stderr.strip() == (
        f"error: {folder / 'qrels' / 'test.tsv'}:2: unknown document id 'nope' (1 such rows); "
        "fix the id, add the document, or pass --skip-unknown to skip such rows"
    )
    assert not (tmp_path / "out").exists()


def test_a_ceiling_above_every_teacher_score_is_refused_before_writing(
    small_beir: Path, tiny_cross_encoder: Path, tmp_path: Path
) -> None:
    # A cross-encoder's score range is unknown until it has scored: the refusal comes after the teacher,
    # and before any output exists.
    # float32: the random teacher's scores are too close for bfloat16, whose guard would add its own warning line.
    out = tmp_path / "out"
    args = ["--no-dense", "--cross-encoder", tiny_cross_encoder, "--expansion-depth", "0", "--method", "topk-abs"]
    code, _, stderr = run_cli(
        "mine", small_beir, "--out", out, "-q", *args, "--max-score", -1e9, "--precision", "float32"
    )
    assert code == 2
    assert "error: settings: no candidate survived the filter (topk-abs removed " in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


_subprocess = miner_process


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--out", "/proc/miner-out"], "error: /proc/miner-out: output folder is not writable"),
        (["--out", "{file}/sub"], "is a file, not a folder"),
        (["--out", "o", "--method", "topk-magic"], "error: --method: Input should be"),
        (["--out", "o", "--num-negatives", "50", "--range-max", "20"], "holds fewer candidates than"),
        (["--out", "o", "--no-bm25", "--no-dense"], "both off"),
    ],
    ids=["unwritable", "out-is-file", "bad-method", "window-too-narrow", "no-retriever"],
)
def test_refusals_in_a_real_process(args: list[str], expected: str, small_beir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = [a.replace("{file}", str(blocker)) for a in args]
    result = _subprocess("mine", small_beir, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_names_the_line(small_beir: Path, tmp_path: Path) -> None:
    config = tmp_path / "mine.toml"
    config.write_text('out = "o"\n\n[filter]\nmethod = "none"\nmargn = 0.1\n')
    result = _subprocess("mine", small_beir, "--config", config, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {config}:5: filter.margn: unknown setting; did you mean filter.margin? "
        "(examples/mine.toml lists every setting)"
    )


def test_a_process_reports_to_the_server_in_prefect_api_url(
    small_beir: Path, tmp_path: Path, prefect_server: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    result = _subprocess(
        "mine",
        small_beir,
        "--out",
        "out",
        "-q",
        "--no-bm25",
        "--num-negatives",
        "2",
        cwd=tmp_path,
        PREFECT_API_URL=prefect_server,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["mine-hard-negatives"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=200,
        )
    reported = [r for r in runs if r.parameters.get("config", {}).get("out") == str(tmp_path / "out")]
    assert len(reported) == 1 and reported[0].state is not None and reported[0].state.is_completed()
    assert reported[0].parameters["config"]["sample"]["num_negatives"] == manifest["config"]["sample"]["num_negatives"]


def test_without_a_prefect_api_the_stages_run_in_process_and_prefect_on_request(
    small_beir: Path, tmp_path: Path
) -> None:
    home = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    local = _subprocess("mine", small_beir, "--out", "local", "-q", "--no-bm25", cwd=tmp_path, **home)
    assert local.returncode == 0, local.stderr
    assert not (tmp_path / "prefect-home").exists()  # no Prefect server was started
    requested = _subprocess(
        "mine", small_beir, "--out", "out", "-q", "--no-bm25", "--engine", "prefect", cwd=tmp_path, **home
    )
    assert requested.returncode == 0, requested.stderr
    assert (tmp_path / "prefect-home").is_dir()  # the temporary server kept its database there
    assert "INFO" not in requested.stderr  # --quiet holds even after Prefect's server reconfigures logging
    # Either way the same rows.
    for name in ("negatives.parquet", "triplets.parquet"):
        assert pq.read_table(tmp_path / "local" / name).equals(pq.read_table(tmp_path / "out" / name))


def _lock(out: Path, pid: int) -> Path:
    from miner.lock import lock_path

    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": __import__("socket").gethostname(), "started": "earlier"}))
    return path


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(small_beir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _lock(out, holder.pid)
        code, _, stderr = run_cli("mine", small_beir, "--out", out, "-q")
        assert code == 2
        assert f"in use by process {holder.pid}" in stderr and "started earlier" in stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and the next run takes it over, then releases it.
    lock = _lock(out, holder.pid)
    code, _, stderr = run_cli("mine", small_beir, "--out", out, "-q", "--no-bm25", "--num-negatives", "2")
    assert code == 0, stderr
    assert (out / "manifest.json").is_file() and not lock.exists()
