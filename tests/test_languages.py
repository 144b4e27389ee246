"""Language-aware BM25: every supported analyser on real Lucene, the choice of language, and its refusals."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from conftest import refused, run_cli, write_beir

from miner.candidates import bm25_index_settings, bm25_search, build_bm25_index
from miner.ingest import ingest
from miner.language import LANGUAGES, choose_language, detect_language, sample_texts


def _corpus(texts: dict[str, str]) -> pa.Table:
    return pa.table({"doc_id": list(texts), "text": list(texts.values()), "text_hash": list(texts)})


def _hits(tmp_path: Path, texts: dict[str, str], query: str, language: str, k: int = 10) -> list[str]:
    """Document ids BM25 returns for `query`, best first, over `texts` indexed and searched as `language`."""
    index = tmp_path / f"index-{language}"
    build_bm25_index(_corpus(texts), index, threads=1, language=language)
    queries = pa.table({"query_id": ["q"], "text": [query], "text_hash": ["q"]})
    found = pl.from_arrow(bm25_search(index, queries, k=k, threads=1, language=language))
    return found.sort("rank")["doc_id"].to_list()


def test_the_language_table_is_anserinis() -> None:
    """Every code but English is one Anserini's AnalyzerMap knows, with the same analyser; only Thai is left out."""
    from miner.java import start_jvm

    start_jvm()
    from jnius import autoclass

    mapped = autoclass("io.anserini.analysis.AnalyzerMap").analyzerMap
    in_jar = {code: mapped.get(code) for code in mapped.keySet().toArray()}
    ours = {code: analyzer for code, (_, analyzer) in LANGUAGES.items() if code != "en"}
    assert ours == {code: analyzer for code, analyzer in in_jar.items() if code != "th"}
    assert {"zh", "ja", "ko", "de", "fr", "es", "ar", "ru", "hi"} <= set(LANGUAGES)


@pytest.mark.parametrize("language", sorted(LANGUAGES))
def test_every_language_indexes_and_searches(language: str, tmp_path: Path) -> None:
    texts = {"d1": "hardneg 12345 hardneg", "d2": "other 67890"}
    assert _hits(tmp_path, texts, "hardneg", language) == ["d1"]


# Under English, Lucene's tokenizer splits Han text into single characters, so a two-character word matches any
# passage holding both characters anywhere: the short passages below, with 大 and 学 apart, outrank the one
# with the word 大学 (university). The CJK analyser indexes character pairs, and only that passage has the pair.
CHINESE = {
    "word": "这所城市有一所历史悠久的大学\uff0c每年都有很多新生来这里读书和生活\uff0c校园里的树木也很多",
    "apart-1": "学生很大",
    "apart-2": "大人学习",
    "apart-3": "大家都在学",
}


def test_chinese_two_character_word_found_under_zh_not_en(tmp_path: Path) -> None:
    assert _hits(tmp_path, CHINESE, "大学", "zh") == ["word"]
    under_english = _hits(tmp_path, CHINESE, "大学", "en")
    assert under_english[0] != "word"
    assert set(under_english) == set(CHINESE)


# "Haus" (house) and "Häuser" (houses), "книга" (a book) and "книги" (books): each language's stemmer brings
# the two forms to one term; the English one cannot (and Russian has a script of its own).
GERMAN = {
    "inflected": "Die alten Häuser am Fluss wurden renoviert",
    "other": "Der Zug fährt morgen früh nach Berlin",
}
RUSSIAN = {
    "inflected": "Мы читали интересные книги в городской библиотеке",
    "other": "Поезд отправляется завтра рано утром",
}


@pytest.mark.parametrize(("language", "texts", "query"), [("de", GERMAN, "Haus"), ("ru", RUSSIAN, "книга")])
def test_inflected_word_matches_under_its_language_only(
    language: str, texts: dict[str, str], query: str, tmp_path: Path
) -> None:
    assert _hits(tmp_path, texts, query, language) == ["inflected"]
    assert _hits(tmp_path, texts, query, "en") == []


def test_index_cache_key_names_the_analyser() -> None:
    keys = {language: bm25_index_settings(language) for language in ("en", "zh", "ko", "de")}
    assert len(set(keys.values())) == 4
    # zh and ko share Lucene's CJK analyser class: the key must still tell them apart.
    assert "CJKAnalyzer" in keys["zh"] and "language=zh" in keys["zh"]
    assert keys["en"].startswith("analyzer=anserini-default-english;")


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (list(CHINESE.values()), "zh"),
        (list(GERMAN.values()), "de"),
        (list(RUSSIAN.values()), "ru"),
        (["東京タワーに行きました。駅から歩いて十分です。"], "ja"),
        (["서울은 한국의 수도입니다"], "ko"),
        (["Les enfants jouent dans le jardin et le chien court sur la prairie parce qu'il fait chaud."], "fr"),
        (["Los niños juegan en el jardín y el perro corre por el prado porque hace mucho calor."], "es"),
    ],
)
def test_detection(texts: list[str], expected: str) -> None:
    assert detect_language(texts).language == expected


@pytest.mark.parametrize("collection", ["cranfield", "cisi"])
def test_english_collections_pass_without_a_warning(
    collection: str, cranfield: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # CISI is one of the shared development collections, outside the repository.
    shared = Path(os.environ.get("MINER_DEV_DATASETS", "/work/shared/datasets"))
    folder = cranfield if collection == "cranfield" else shared / "cisi"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not on this machine")
    corpus = ingest(folder).corpus
    with caplog.at_level(logging.INFO, logger="miner.language"):
        assert choose_language("en", corpus)[0] == "en"
        assert choose_language("auto", corpus)[0] == "en"
    assert not [r for r in caplog.records if r.name == "miner.language" and r.levelno >= logging.WARNING]
    assert detect_language(sample_texts(corpus)).stop_shares["en"] > 0.2


def test_mismatch_warns_in_one_line_saying_what_to_pass(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="miner.language"):
        language, record = choose_language("en", _corpus(CHINESE))
    assert language == "en"
    assert record["analyzer"] == LANGUAGES["en"][1]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "\n" not in warning
    assert "looks like Chinese" in warning and "pass --language zh" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="miner.language"):
        choose_language("de", _corpus(GERMAN))
    assert not caplog.records


def _chinese_beir(folder: Path) -> Path:
    corpus = [{"_id": doc_id, "title": "", "text": text} for doc_id, text in CHINESE.items()]
    corpus += [{"_id": f"extra-{i}", "title": "", "text": f"第{i}篇文章讲的是天气和旅行"} for i in range(12)]
    queries = [{"_id": "q1", "text": "大学"}, {"_id": "q2", "text": "天气"}]
    return write_beir(folder, corpus, queries, [("q1", "word", 1), ("q2", "extra-3", 1)])


def test_auto_detects_chinese_in_a_run_and_the_manifest_records_it(tmp_path: Path) -> None:
    data = _chinese_beir(tmp_path / "zh")
    out = tmp_path / "out"
    code, _, stderr = run_cli("mine", data, "--out", out, "--language", "auto", "--num-negatives", "2", "--quiet")
    assert code == 0, stderr
    bm25 = json.loads((out / "manifest.json").read_text())["counts"]["bm25_index"]
    assert bm25["language"] == "zh" and bm25["language_setting"] == "auto"
    assert bm25["analyzer"] == "org.apache.lucene.analysis.cjk.CJKAnalyzer"
    assert bm25["sample_looks_like"].startswith("Chinese")
    assert bm25["jvm"] != "not started"  # how it started depends on which test started it: tests/test_java.py


def test_unknown_language_is_refused_before_anything_runs(tmp_path: Path, cranfield: Path) -> None:
    out = tmp_path / "out"
    stderr = refused(
        ("mine", cranfield, "--out", out, "--language", "klingon"),
        "error: --language: unsupported language 'klingon'",
        out,
    )
    assert "zh" in stderr and "auto" in stderr
