"""The agent's log lines: one per request, plus notes (refused connections, stray errors).

Every value that came from a client is escaped and bounded before it is written: the
journal keeps raw bytes, so a control character in a request path could forge a line or
drive a terminal, and a 60 KiB path would be 60 KiB of journal per request. Request bodies
are never logged: a Create's options can hold a credentials URI.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import TYPE_CHECKING, Optional, TextIO

from efsplug.agent.plugin import Answer

if TYPE_CHECKING:
    from efsplug.logsink import LogSink

MAX_FIELD = 200  # characters of a path or volume name in a line, escapes included
MAX_ERR = 500
ELLIPSIS = "..."
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", " ": "\\x20"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if not ch.isprintable():  # e.g. U+2028 LINE SEPARATOR, bidi overrides
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return ch


def log_field(text: str, limit: int = MAX_FIELD) -> str:
    """text as one space-free token of at most limit characters: controls, spaces and other
    unprintable characters escaped, backslash doubled, the rest cut with '...'."""
    pieces = [_escape(ch) for ch in text[: limit + 1]]  # every piece is at least one character
    if len(text) <= limit and sum(len(p) for p in pieces) <= limit:
        return "".join(pieces)
    kept, used = [], 0
    for piece in pieces:  # cut between escapes, never inside one
        if used + len(piece) > limit - len(ELLIPSIS):
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + ELLIPSIS


class RequestLog:
    """One line per request on stdout (journald): endpoint, volume, duration, outcome.

    With a sink ([cloudwatch-log] enabled), the same line goes to CloudWatch Logs too.
    """

    def __init__(self, out: Optional[TextIO] = None, sink: Optional[LogSink] = None) -> None:
        self.out = out
        self.sink = sink
        self._lock = threading.Lock()

    def request(self, endpoint: str, answer: Answer, seconds: float) -> None:
        endpoint = log_field(endpoint[1:] if endpoint.startswith("/") else endpoint) or "-"
        volume = log_field(answer.volume) if answer.volume else "-"
        # json.dumps: quotes, controls and non-ASCII escaped, so one request stays one line.
        outcome = "ok" if not answer.err else f"error err={json.dumps(answer.err[:MAX_ERR])}"
        self.note(f"endpoint={endpoint} volume={volume} duration_ms={seconds * 1000:.1f} outcome={outcome}")

    def note(self, line: str) -> None:
        """A line the agent composed; anything from a client in it must be log_field()ed."""
        out = self.out or sys.stdout
        with self._lock:
            out.write(line + "\n")
            out.flush()
        if self.sink is not None:
            self.sink.emit(line)  # never blocks: a bounded queue
