"""Models are resolved before anything runs: an unreachable hub id and a bi-encoder given as the cross-encoder
are refused with one line, before ingest, leaving nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from miner.config import load_config
from miner.errors import InputError
from miner.lock import lock_path
from miner.models import SMALL_CHUNK_BATCHES, encode, encode_chunk, in_batches, token_batches, token_lengths
from miner.pipeline import resolve_models
from miner.resume import work_dir


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def _nothing_left(out: Path) -> None:
    assert not out.exists() and not work_dir(out).exists() and not lock_path(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == []


@pytest.fixture
def silent_hub() -> Iterator[tuple[str, list[socket.socket]]]:
    """A hub endpoint that accepts connections and never answers, as a network that swallows packets does;
    yields its URL and the connections it accepted."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    for connection in accepted:
        connection.close()


@pytest.mark.parametrize(
    ("flag", "spec", "instead"),
    [
        ("--model", "BAAI/bge-small-en", "or the bundled 'all-MiniLM-L6-v2'"),
        ("--cross-encoder", "BAAI/bge-reranker-base", "leave out --cross-encoder"),
    ],
)
def test_a_hub_id_the_network_does_not_answer_for_is_refused_after_one_request_before_ingest(
    tiny_beir: Path,
    tmp_path: Path,
    silent_hub: tuple[str, list[socket.socket]],
    flag: str,
    spec: str,
    instead: str,
) -> None:
    url, accepted = silent_hub
    hub_settings = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT")
    env = {k: v for k, v in os.environ.items() if k not in hub_settings and k != "PREFECT_API_URL"}
    env |= {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home")}  # an empty hub cache
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "miner.cli", "mine", str(tiny_beir), "--out", str(out), flag, spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    line = _one_line(result.stderr)
    assert line.startswith(f"error: {spec}: model not found: ") and f"{url} did not answer" in line, line
    assert str(tmp_path / "hf-home") in line and instead in line, line
    # One request, no retries: the hub client's own retries took over a minute in the issue.
    assert len(accepted) == 1
    _nothing_left(out)


def _refused_in_process(data: Path, tmp_path: Path, *args: str) -> str:
    """The one line `miner mine DATA ARGS` is refused with, having left nothing beside its output folder."""
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    code, _, stderr = run_cli("mine", data, "--out", out, *args)
    assert code == 2
    line = _one_line(stderr)
    _nothing_left(out)
    return line


def test_a_hub_id_when_offline_is_refused_naming_the_hub_cache(tiny_beir: Path, tmp_path: Path) -> None:
    line = _refused_in_process(tiny_beir, tmp_path, "--model", "BAAI/bge-small-en")
    assert "not in the hub cache" in line and "HF_HUB_OFFLINE is set" in line, line


def test_a_bi_encoder_given_as_the_cross_encoder_is_refused_before_any_work(tiny_beir: Path, tmp_path: Path) -> None:
    line = _refused_in_process(tiny_beir, tmp_path, "--cross-encoder", "all-MiniLM-L6-v2")
    assert line.startswith("error: all-MiniLM-L6-v2: not a cross-encoder: its weights are a BertModel"), line
    assert "randomly initialised head" in line and "--allow-untrained-head" in line, line


def test_allow_untrained_head_lets_the_bi_encoder_through_and_a_real_cross_encoder_needs_no_flag(
    tiny_beir: Path, tmp_path: Path, tiny_cross_encoder: Path, bundled_model_path: Path
) -> None:
    base = {"data": tiny_beir, "out": tmp_path / "out"}
    allowed = load_config(
        None, {**base, "models.cross_encoder": "all-MiniLM-L6-v2", "models.allow_untrained_head": True}
    )
    _, teacher = resolve_models(allowed)
    assert teacher is not None and Path(teacher.location) == bundled_model_path
    # The tests' random cross-encoder is saved with its head: its scores are random, but not a fresh head's.
    _, teacher = resolve_models(load_config(None, {**base, "models.cross_encoder": str(tiny_cross_encoder)}))
    assert teacher is not None and teacher.origin == "local"


def test_one_progress_bar_counts_every_text_across_chunks(
    embedding_model, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa

    from miner import models

    texts = [f"query number {n} about lift" for n in range(7)]
    table = pa.table({"query_id": [str(n) for n in range(7)], "text": texts, "text_hash": texts})
    monkeypatch.setattr(models, "ENCODE_CHUNK", 3)  # three chunks: a bar per chunk would restart twice
    embeddings = models.embed_table(
        embedding_model, table, id_column="query_id", kind="query", batch_size=2, show_progress=True
    )
    assert embeddings.encoded == 7
    shown = capsys.readouterr().err
    assert "Encoding queries" in shown and "querys" not in shown
    totals = {part.split("/")[1].split()[0] for part in shown.replace("\r", "\n").split("|") if "/" in part}
    assert totals == {"7"}, shown  # one bar, over all seven texts


def test_inspect_prints_a_flag_as_true_not_as_one(tmp_path: Path) -> None:
    import json

    manifest = {"teacher": "t", "counts": {"dense_index": {"exact": True, "documents": 3}}, "scores": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, _ = run_cli("inspect", tmp_path)
    assert code == 0
    lines = {line.split()[0]: line.split()[1] for line in stdout.splitlines() if line.startswith("  ")}
    assert lines["exact"] == "true" and lines["documents"] == "3"


def test_audit_refuses_a_bi_encoder_as_cross_encoder_before_reading_the_data(tmp_path: Path) -> None:
    out, data = tmp_path / "audit", tmp_path / "not-read-yet"  # ingest would refuse it: the model comes first
    setting = "ce: models.cross_encoder=all-MiniLM-L6-v2"
    code, _, stderr = run_cli("audit", data, "--out", out, "--setting", "plain: filter.pct=0.9", "-s", setting)
    assert code == 2
    assert _one_line(stderr).startswith("error: all-MiniLM-L6-v2: not a cross-encoder: ")
    assert not out.exists()


def test_a_model_sentence_transformers_saved_as_a_cross_encoder_passes_whatever_its_architecture(
    tmp_path: Path, bundled_model_path: Path
) -> None:
    import json
    import shutil

    from miner.models import check_cross_encoder, resolve_model

    folder = tmp_path / "reranker"
    shutil.copytree(bundled_model_path, folder)  # a BertModel: refused as it is
    with pytest.raises(InputError, match="not a cross-encoder"):
        check_cross_encoder(resolve_model(str(folder)))
    # A causal-LM reranker, say: no ...ForSequenceClassification, but saved by sentence-transformers as a CrossEncoder.
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"model_type": "CrossEncoder"}))
    check_cross_encoder(resolve_model(str(folder)))


@pytest.fixture(scope="module")
def custom_code_cross_encoder(tmp_path_factory: pytest.TempPathFactory, bundled_model_path: Path) -> Path:
    """A real tiny cross-encoder whose config.json maps AutoModelForSequenceClassification to a class in a module
    of its own folder, as hub models with custom code do: loading it runs that module."""
    import json

    from random_models import random_cross_encoder

    folder = random_cross_encoder(tmp_path_factory.mktemp("custom-code-model"), bundled_model_path)
    (folder / "modeling_marked.py").write_text(
        "from transformers import BertForSequenceClassification\n\n\n"
        "class MarkedBert(BertForSequenceClassification):\n"
        "    pass\n",
        encoding="utf-8",
    )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_marked.MarkedBert"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("flag", ["--cross-encoder", "--model"])
def test_a_model_folder_with_its_own_code_is_refused_without_trust_remote_code(
    flag: str, tiny_beir: Path, tmp_path: Path, custom_code_cross_encoder: Path
) -> None:
    line = _refused_in_process(tiny_beir, tmp_path, flag, str(custom_code_cross_encoder))
    assert line.startswith(f"error: {custom_code_cross_encoder}: the model folder carries its own code "), line
    assert "config.json auto_map -> modeling_marked.MarkedBert" in line, line
    assert "pass --trust-remote-code if you trust it" in line, line


def test_trust_remote_code_loads_the_folders_own_class(
    tiny_beir: Path, tmp_path: Path, custom_code_cross_encoder: Path
) -> None:
    from miner.models import load_cross_encoder

    settings = {"data": tiny_beir, "out": tmp_path / "out", "models.cross_encoder": str(custom_code_cross_encoder)}
    with pytest.raises(InputError, match="--trust-remote-code"):
        resolve_models(load_config(None, settings))
    _, teacher = resolve_models(load_config(None, {**settings, "models.trust_remote_code": True}))
    assert teacher is not None and teacher.trust_remote_code
    model = load_cross_encoder(teacher, show_progress=False)
    # The class from the folder's own module, which only a load with trust_remote_code=True uses.
    assert type(model.model).__name__ == "MarkedBert"
    assert model.predict([("lift", "lift on a swept wing")]).shape == (1,)


@pytest.mark.parametrize("most", [1, 3, 64])
def test_token_batches_take_every_row_once_longest_first_within_both_bounds(most: int) -> None:
    lengths = np.random.default_rng(7).integers(1, 700, size=500)
    lengths[:5] = 3000  # longer than the budget: a batch of its own
    batches = token_batches(lengths, most, tokens=2048)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(500))
    assert (np.diff(lengths[rows]) <= 0).all()
    for batch in batches:
        assert 1 <= len(batch) <= most
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 2048
    # Short texts fill batches up to `most`: the budget does not cut them small.
    short = token_batches(np.full(2000, 10), most, tokens=2048)
    assert [len(batch) for batch in short[:-1]] == [most] * (len(short) - 1)


def test_a_small_chunk_is_cut_into_enough_batches_for_every_core_whatever_the_threads() -> None:
    import torch

    lengths = np.random.default_rng(3).integers(5, 300, size=32)
    threads = torch.get_num_threads()
    try:
        cuts = []
        for count in (1, 2):
            torch.set_num_threads(count)
            cuts.append([batch.tolist() for batch in token_batches(lengths, 64)])
    finally:
        torch.set_num_threads(threads)
    assert cuts[0] == cuts[1]  # the batches, and so the vectors, do not depend on the machine
    assert len(cuts[0]) >= SMALL_CHUNK_BATCHES
    assert sorted(row for batch in cuts[0] for row in batch) == list(range(32))
    # One text cannot be cut: one batch.
    assert [batch.tolist() for batch in token_batches(np.array([40]), 64)] == [[0]]


def test_batches_side_by_side_give_the_vectors_of_one_batch_after_another(embedding_model) -> None:
    import pyarrow as pa
    import torch

    texts = [f"{'boundary layer ' * (i % 9)}flow over a wing number {i}" for i in range(60)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vectors, _ = encode_chunk(embedding_model, pa.array(texts), kind="document", batch_size=8)
        assert torch.get_num_threads() == 2  # the run's setting is back
        lengths = np.asarray([len(embedding_model.tokenizer(t)["input_ids"]) for t in texts])
        torch.set_num_threads(1)  # each batch's share of 2 threads: one
        for rows in token_batches(lengths, 8):
            alone = encode(
                embedding_model, [texts[r] for r in rows], kind="document", batch_size=8, show_progress=False
            )
            np.testing.assert_array_equal(vectors[rows], alone)
    finally:
        torch.set_num_threads(threads)


def test_batches_side_by_side_are_taken_in_order_on_the_calling_thread_and_an_error_stops_them() -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = [np.arange(i, i + 1) for i in range(12)]
        taken: list[tuple[int, str]] = []
        in_batches(
            batches,
            lambda rows: int(rows[0]) * 2,
            lambda rows, x: taken.append((x, threading.current_thread().name)),
            settle=lambda: None,
        )
        assert taken == [(2 * i, threading.current_thread().name) for i in range(12)]

        # The settling call runs first, on this thread, and every batch runs on the pool.
        events: list[tuple[str, str]] = []

        def computed_where(rows: np.ndarray) -> int:
            events.append(("batch", threading.current_thread().name))
            return 0

        in_batches(
            batches,
            computed_where,
            lambda rows, x: None,
            settle=lambda: events.append(("settle", threading.current_thread().name)),
        )
        assert events[0] == ("settle", threading.current_thread().name)
        assert len(events) == 13 and all(name.startswith("batch") for kind, name in events[1:])

        computed: list[int] = []

        def failing(rows: np.ndarray) -> int:
            if rows[0] == 3:
                raise ValueError("batch 3")
            time.sleep(0.01)
            computed.append(int(rows[0]))
            return 0

        with pytest.raises(ValueError, match="batch 3"):
            in_batches([np.arange(i, i + 1) for i in range(400)], failing, lambda rows, x: None, settle=lambda: None)
        assert len(computed) < 100  # of 399: the batches not yet started were dropped
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_token_lengths_taken_in_parts_side_by_side_are_the_tokenizers_own(embedding_model) -> None:
    import pyarrow as pa
    import torch

    texts = [f"{'shock wave ' * (i % 37)}over a cone number {i}" for i in range(700)]
    expected = [len(ids) for ids in embedding_model.tokenizer(texts)["input_ids"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert token_lengths(embedding_model, pa.array(texts)).tolist() == expected
    finally:
        torch.set_num_threads(threads)
