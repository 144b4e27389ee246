"""`miner report`: the page and figures of a real mining run, rendered by headless Chromium; refusals."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from miner.report import (
    FIGURES,
    INDEX_FILE,
    NEGATIVE_COLOR,
    POOL_COLOR,
    POSITIVE_COLOR,
    RULE_COLOR,
    SHORT_TEXT,
    filter_removals,
    negatives_per_pair,
    read_run,
    source_mix,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (`apt-get install chromium`)")


@pytest.fixture(scope="module")
def mined(tiny_beir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    code, _, stderr = run_cli("mine", tiny_beir, "--out", out, "--quiet")
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def index(mined: Path) -> Path:
    code, stdout, stderr = run_cli("report", mined)
    assert code == 0, stderr
    path = Path(stdout.strip())
    assert path == (mined / "report" / INDEX_FILE).resolve()
    return path


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _rgb(path: Path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return np.round(image[..., :3] * 255).astype(int)


def _pixels_of(rgb: np.ndarray, color: str) -> int:
    target = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    # A little tolerance: the browser rescales the figures.
    return int((np.abs(rgb - target).max(axis=2) <= 3).sum())


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    # Own profile: runs in parallel do not share (or lock) the user's.
    command += [f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_page_names_every_figure_and_each_is_a_png_with_its_data_drawn(index: Path) -> None:
    page = index.read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources == [figure.file for figure in FIGURES]
    # The bars each figure draws in a solid colour; a blank or failed figure has none of its colour.
    colour_of = {
        "margin.png": POOL_COLOR,
        "negatives_per_pair.png": POSITIVE_COLOR,
        "sources.png": NEGATIVE_COLOR,
        "filter.png": RULE_COLOR,
        "scores.png": None,  # overlaid at 60% opacity: blended colours, checked by count below
    }
    for name in sources:
        path = index.parent / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 5_000
        rgb = _rgb(path)
        assert rgb.shape[0] > 300 and rgb.shape[1] > 500
        assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20, name
        if colour_of[name]:
            assert _pixels_of(rgb, colour_of[name]) > 1_000, name


def test_figure_data_agree_with_the_run(mined: Path, index: Path) -> None:
    run = read_run(mined)
    manifest = json.loads((mined / "manifest.json").read_text())
    negatives = pq.read_table(mined / "negatives.parquet")
    per_pair = negatives_per_pair(run)
    assert sum(per_pair.values()) == manifest["counts"]["sample"]["pairs"]
    assert sum(size * pairs for size, pairs in per_pair.items()) == negatives.num_rows
    mix = source_mix(run)
    assert sum(mix["candidate pool"].values()) == manifest["counts"]["candidates"]["pool"]
    assert sum(mix["exported negatives"].values()) == negatives.num_rows
    removals = filter_removals(run)
    assert "kept" not in removals
    assert sum(removals.values()) + manifest["counts"]["filter"]["kept"] == manifest["counts"]["candidates"]["pool"]

    page = index.read_text(encoding="utf-8")
    assert manifest["teacher"] in page
    assert f"<td>{manifest['config']['data']}</td>" in page
    for stage in manifest["timings_s"]:
        assert f"<th>{stage}</th>" in page
    # tiny_beir has 5 queries, fewer than the sample size: every query is shown, once.
    example_rows = page.split('<table class="examples">')[1].split("</table>")[0].count("<tr>") - 1
    assert example_rows == len(set(negatives.column("query_id").to_pylist())) == 5


def test_user_text_is_escaped_and_long_text_folded(mined: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(mined, copy, ignore=shutil.ignore_patterns("report"))
    hostile = "<script>alert('x')</script> & \"quoted\""
    long_text = "lift " * SHORT_TEXT
    frame = pl.read_parquet(copy / "negatives.parquet")
    first_query = frame["query_id"][0]
    frame = frame.with_columns(
        query=pl.when(pl.col("query_id") == first_query).then(pl.lit(hostile)).otherwise(pl.col("query")),
        negative=pl.lit(long_text),
    )
    frame.write_parquet(copy / "negatives.parquet")
    elsewhere = tmp_path / "pages" / "report"

    code, stdout, stderr = run_cli("report", copy, "--out-dir", elsewhere)

    assert code == 0, stderr
    assert Path(stdout.strip()) == (elsewhere / INDEX_FILE).resolve()
    page = (elsewhere / INDEX_FILE).read_text(encoding="utf-8")
    assert hostile not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in page
    assert f"<details><summary>{long_text[:SHORT_TEXT].rstrip()}…</summary>{long_text}</details>" in page
    assert not (copy / "report").exists()
    # Nothing but the report: no scratch folder left beside it.
    assert _tree(tmp_path / "pages") == sorted(["report", *(f"report/{f.file}" for f in FIGURES), "report/index.html"])

    # A second report over the first replaces it in place.
    (elsewhere / "scores.png").write_bytes(b"stale")
    code, _, stderr = run_cli("report", copy, "--out-dir", elsewhere)
    assert code == 0, stderr
    assert (elsewhere / "scores.png").read_bytes()[:8] == PNG_SIGNATURE
    assert _tree(tmp_path / "pages") == sorted(["report", *(f"report/{f.file}" for f in FIGURES), "report/index.html"])


@needs_chromium
def test_chromium_renders_the_page_with_every_figure_loaded(index: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    url = index.as_uri()
    result = _chromium(f"--screenshot={shot}", "--window-size=1200,3000", url, profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    rgb = _rgb(shot)
    assert rgb.shape[:2] == (3000, 1200)
    assert (rgb.min(axis=2) < 245).mean() > 0.05
    # These colours are drawn only inside the figures: seeing them means the PNGs loaded and were painted.
    for colour in (POSITIVE_COLOR, NEGATIVE_COLOR, POOL_COLOR, RULE_COLOR):
        assert _pixels_of(rgb, colour) > 1_000, colour

    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The page's load handler marks each image the browser decoded.
    marks = re.findall(r'<img src="([^"]+)"[^>]*data-loaded="(\w+)"', dom.stdout)
    assert marks == [(figure.file, "yes") for figure in FIGURES]


@needs_chromium
def test_chromium_check_sees_a_missing_figure(index: Path, tmp_path: Path) -> None:
    copy = tmp_path / "report"
    shutil.copytree(index.parent, copy)
    (copy / "filter.png").unlink()

    dom = _chromium("--dump-dom", (copy / INDEX_FILE).as_uri(), profile=tmp_path / "profile")

    assert dom.returncode == 0, dom.stderr[-2000:]
    marks = dict(re.findall(r'<img src="([^"]+)"[^>]*data-loaded="(\w+)"', dom.stdout))
    assert marks == {figure.file: "no" if figure.file == "filter.png" else "yes" for figure in FIGURES}
    assert "figure file missing: filter.png" in dom.stdout


def _refused(out: Path, watched: Path, *args: str | Path) -> str:
    before = _tree(watched)
    code, stdout, stderr = run_cli("report", out, *args)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert _tree(watched) == before
    return lines[0]


def test_refuses_a_missing_folder(tmp_path: Path) -> None:
    line = _refused(tmp_path / "nowhere", tmp_path)
    assert f"{tmp_path / 'nowhere'}: no such folder" in line


def test_refuses_a_folder_without_manifest(mined: Path, tmp_path: Path) -> None:
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    shutil.copy(mined / "negatives.parquet", unfinished)
    line = _refused(unfinished, tmp_path)
    assert f"{unfinished / 'manifest.json'}: no manifest here" in line
    assert "miner mine" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_refuses_a_damaged_negatives_file(mined: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "run"
    shutil.copytree(mined, copy, ignore=shutil.ignore_patterns("report"))
    data = (copy / "negatives.parquet").read_bytes()
    broken = data[: len(data) // 2] if damage == "truncated" else b"not parquet at all" * 100
    (copy / "negatives.parquet").write_bytes(broken)
    line = _refused(copy, tmp_path, "--out-dir", tmp_path / "pages")
    assert f"{copy / 'negatives.parquet'}: not a readable Parquet file" in line
    assert "re-run" in line


def test_importing_the_cli_does_not_import_matplotlib() -> None:
    # `miner mine` shares the CLI module; matplotlib's import must stay inside the report's drawing.
    probe = "import sys, miner.cli, miner.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_false_negative_section_agrees_with_the_manifest(mined: Path, index: Path) -> None:
    manifest = json.loads((mined / "manifest.json").read_text())
    negatives = pl.read_parquet(mined / "negatives.parquet")
    page = index.read_text(encoding="utf-8")
    section = page.split("<h2>False negatives</h2>")[1].split("<h2>")[0]
    expansion = manifest["filter_choice"]["expansion"]
    assert f"top {expansion['expansion_depth']} candidates" in section
    removed = manifest["counts"]["filter"]["positive_expansion"]
    assert f"positive_expansion {removed}" in section
    # tiny_beir has 5 queries: too few to hold positives out on, and the page says so rather than guess.
    assert manifest["false_negatives_estimate"]["rate"] is None
    assert "No false-negative rate could be estimated" in section
    above = negatives.filter(pl.col("negative_score") >= pl.col("positive_score")).height
    assert f"scores {above} of {negatives.height} negatives" in section
    assert "likeliest false negatives" not in page


def test_captions_show_code_not_backticks(index: Path) -> None:
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", index.read_text(encoding="utf-8"))
    assert captions and not [caption for caption in captions if "`" in caption]
    assert any("<code>positive</code>" in caption for caption in captions)


def test_re_mining_removes_the_stale_report_and_the_new_one_names_its_run(
    mined: Path, tiny_beir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(mined, out)
    code, stdout, stderr = run_cli("report", out)
    assert code == 0, stderr
    old = json.loads((out / "manifest.json").read_text())
    assert old["run_id"] in Path(stdout.strip()).read_text(encoding="utf-8")

    code, _, stderr = run_cli("mine", tiny_beir, "--out", out, "-q", "--num-negatives", "3")
    assert code == 0, stderr
    assert not (out / "report").exists()  # it showed the replaced run's numbers
    new = json.loads((out / "manifest.json").read_text())
    assert new["run_id"] != old["run_id"]
    code, stdout, stderr = run_cli("report", out)
    assert code == 0, stderr
    page = Path(stdout.strip()).read_text(encoding="utf-8")
    assert new["run_id"] in page and new["created"] in page and old["run_id"] not in page
