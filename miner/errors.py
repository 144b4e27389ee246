"""User mistakes, reported as one line: where, what is wrong, what to do."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar


class InputError(Exception):
    """A problem with what the user gave us (files, settings, paths), never a bug.

    The CLI prints `str(error)` on one line and exits with code 2.
    """

    def __init__(self, where: str | Path, problem: str, fix: str, line: int | None = None, row: int | None = None):
        self.where = str(where)
        # One line, whatever a library put in the text it is built from (pyarrow's messages span lines).
        self.problem = " ".join(problem.split())
        self.fix = " ".join(fix.split())
        self.line = line
        self.row = row
        super().__init__(str(self))

    def __str__(self) -> str:
        location = self.where
        if self.line is not None:
            location += f":{self.line}"
        elif self.row is not None:
            location += f": row {self.row}"
        return f"{location}: {self.problem}; {self.fix}"


# What a run that missed a quality gate exits with: not 2 (a user mistake), not 128 + n (a signal).
GATE_FAILED_EXIT = 3
GATE_FAILED = "quality gate failed"


class GateFailed(Exception):
    """A finished run that missed a quality gate: its outputs were kept aside, not published over OUT.

    `str()` is the one line the CLI prints and a Prefect flow run's state message.
    """

    def __init__(self, reasons: list[str], kept_aside: Path, out: Path, manifest: dict[str, Any]) -> None:
        self.reasons = reasons
        self.kept_aside = kept_aside
        self.out = out
        self.manifest = manifest
        super().__init__(str(self))

    def __reduce__(self) -> tuple[type[GateFailed], tuple[list[str], Path, Path, dict[str, Any]]]:
        # Prefect may persist a failed flow run's exception: it must come back whole from pickle.
        return GateFailed, (self.reasons, self.kept_aside, self.out, self.manifest)

    def __str__(self) -> str:
        return (
            f"{GATE_FAILED}: {'; '.join(self.reasons)}; this run's outputs are kept aside in {self.kept_aside}, and "
            f"{self.out} still holds the last published run"
        )


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread so that every `finally` on the way out runs: temporary files
    are removed, the output lock released. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` on the way takes it for an ordinary failure."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)


# "No space left on device", "File too large" (a size limit), "Disk quota exceeded".
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def disk_full(error: BaseException) -> InputError | None:
    """The one-line form of a write that ran out of room, or None for any other error."""
    if not isinstance(error, OSError) or error.errno not in _DISK_FULL:
        return None
    return InputError(
        error.filename or "disk",
        f"ran out of room while writing ({error.strerror})",
        "free space there (`miner cache clear` frees the embedding cache) or choose another --out / --cache-dir, "
        "then run the same command again: finished stages are kept",
    )


P = ParamSpec("P")
R = TypeVar("R")


def disk_full_as_input_error(function: Callable[P, R]) -> Callable[P, R]:
    """Let a full disk reach the user as an InputError wherever `function` writes."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except OSError as error:
            converted = disk_full(error)
            if converted is None:
                raise
            raise converted from None

    return run
