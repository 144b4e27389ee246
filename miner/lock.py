"""One writer per output folder.

The lock is a file beside the output folder (`.<name>.miner-lock`), so that a refused or failed run leaves
the folder itself untouched. It is created with O_EXCL and names the holder's process id, host and start
time; a lock whose process no longer runs on this host is stale and is taken over.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from miner.errors import InputError


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.miner-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _holder(path: Path) -> dict | None:
    """The live holder of the lock at `path`, or None when there is none or it is stale."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a lock we cannot read was not written whole by a live run
    same_host = holder.get("host") == socket.gethostname()
    if same_host and not _alive(int(holder.get("pid", -1))):
        return None
    return holder


def _refusal(out: Path, holder: dict) -> InputError:
    return InputError(
        out,
        f"in use by process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}",
        "wait for that run to finish or choose another --out",
    )


def check_unlocked(out: Path) -> None:
    """Refuse at once if a live run holds `out` (the CLI calls this before starting anything)."""
    holder = _holder(lock_path(out))
    if holder is not None and holder.get("pid") != os.getpid():
        raise _refusal(out, holder)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock on `out` for the duration of the block; take over a stale one."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None:
                raise _refusal(out, holder) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        break
    else:
        holder = _holder(path) or {"pid": "?", "host": "?", "started": "?"}
        raise _refusal(out, holder)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
