"""A blocking call given a deadline over its whole run (botocore's timeouts are per read)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Tuple, TypeVar

T = TypeVar("T")


def within(seconds: float, call: Callable[[], T]) -> T:
    """call() in a daemon thread, given up on (TimeoutError) after seconds in all.

    botocore's timeouts are per socket read: an endpoint trickling a byte now and then
    would hold the caller for ever. Given up on, the thread is left to end on its own.
    """
    done: "queue.Queue[Tuple[bool, object]]" = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            done.put((True, call()))
        except BaseException as exc:  # handed to the caller, raised there
            done.put((False, exc))

    threading.Thread(target=run, name="efsplug-api-call", daemon=True).start()
    try:
        ok, value = done.get(timeout=seconds)
    except queue.Empty:
        raise TimeoutError(f"no answer within {seconds:g}s") from None
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
