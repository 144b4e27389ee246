"""Work on daemon threads, and waits on it that a signal can cut short.

Daemon threads, so that an interrupted or failed run exits at once rather than after the work: a thread pool's
threads are joined as the interpreter exits. Waits wake four times a second: a signal sent to the process may
land on any of its threads, and Python runs the handler only between the main thread's bytecodes, so a main
thread blocked on a lock would notice a Ctrl-C only when the work it waits for ends.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
A = TypeVar("A")

WAKE_SECONDS = 0.25


def in_background(work: Callable[[], T], name: str) -> Future[T]:
    """`work()` on a daemon thread, as a future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as error:  # handed to whoever takes the result
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def finished(value: T) -> Future[T]:
    """A future that already holds `value`."""
    future: Future[T] = Future()
    future.set_result(value)
    return future


def result_of(future: Future[T]) -> T:
    """`future.result()`, waited for in short naps so that a signal is handled while this thread waits."""
    while not future.done():
        concurrent.futures.wait([future], timeout=WAKE_SECONDS)
    return future.result()


def side_by_side(work: Callable[[A], T], items: Sequence[A], name: str) -> list[T]:
    """`work(item)` for every item, each on a daemon thread of its own, in the items' order."""
    futures = [in_background(lambda item=item: work(item), f"{name}-{number}") for number, item in enumerate(items)]
    return [result_of(future) for future in futures]
