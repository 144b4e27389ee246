"""User mistakes, reported as one line: where, what is wrong, what to do."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A problem with what the user gave us (files, settings, paths), never a bug.

    The CLI prints `str(error)` on one line and exits with code 2.
    """

    def __init__(self, where: str | Path, problem: str, fix: str, line: int | None = None, row: int | None = None):
        self.where = str(where)
        self.problem = problem
        self.fix = fix
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
