"""The JVM's start: a small job's quick start, a large job's defaults (each in a process of its own, as a JVM
starts once per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from miner.java import QUICK_START_OPTIONS, SMALL_JOB_TEXTS

SCRIPT = """
from miner import java
java.expect_job({texts})
java.start_jvm()
from jnius import autoclass
arguments = autoclass("java.lang.management.ManagementFactory").getRuntimeMXBean().getInputArguments()
print(java.jvm_mode())
print(" ".join(arguments.toArray()))
"""


@pytest.mark.parametrize(("texts", "quick"), [(1_623, True), (SMALL_JOB_TEXTS, False)])
def test_a_small_job_starts_the_jvm_with_the_quick_compiler_and_the_serial_collector(texts: int, quick: bool) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(texts=texts)], capture_output=True, text=True, timeout=120, check=True
    )
    mode, arguments = run.stdout.strip().splitlines()
    assert mode.startswith("quick start") == quick
    assert all((option in arguments.split()) == quick for option in QUICK_START_OPTIONS)
    assert "-Xrs" in arguments.split()  # the options every JVM gets are there either way
