"""HTTP/1.1 requests read off a socket: strictly, and within bounds of size and time.

Only what dockerd sends has to work: a POST with a small JSON body framed by
Content-Length (or chunked, as Go's client does when it does not know the length).
Everything else has to fail fast and cheaply: the head, the body and the time one request
may take are all bounded, and framing that could be read two ways (a signed, prefixed or
padded chunk size, Content-Length next to Transfer-Encoding, Content-Lengths that differ)
is refused instead of guessed at. Python's int() reads "-10", "+a", "0x1f", "1_0" and
" 5 " as numbers; none of them is HTTP.
"""

from __future__ import annotations

import math
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from efsplug.errors import shown

MAX_REQUEST_LINE = 8 * 1024  # a longer target is no endpoint of ours
MAX_HEAD = 16 * 1024  # request line + headers (+ chunked trailers); dockerd's are ~250 bytes
MAX_HEADERS = 64  # per head, and per chunked trailer section
MAX_CHUNK_LINE = 1024  # a chunk's size line with its extensions
MAX_CHUNK_DIGITS = 8  # 8 hex digits are 4 GiB; more is padding or a number past any limit
RECV_SIZE = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_TARGET_OK = re.compile(r"/[\x21-\x7e]*")  # visible ASCII only: no controls, spaces, or 8-bit bytes
_FIELD_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # field values may hold HTAB, nothing else below 0x20
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,%d}" % MAX_CHUNK_DIGITS)
_EXT_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")


class ReadTimeout(Exception):
    """The request was not complete by its deadline."""


class ClientGone(Exception):
    """End of input or a reset before the request was complete."""


class BadRequest(Exception):
    """A request that cannot be read or served: the status and Err to answer with.

    The connection is closed after the answer: what follows on it cannot be framed.
    """

    def __init__(self, status: int, text: str, target: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.target = target  # for the log line; possibly hostile, escaped when logged


class Reader:
    """A socket's bytes, buffered, with every wait bounded by `deadline` (time.monotonic()).

    The deadline belongs to the whole request, not to one recv: a client that trickles a
    byte every few seconds would renew a per-read timeout for ever and pin its thread.
    The buffer never holds more than what was asked for plus one recv.
    """

    def __init__(self, sock: socket.socket, clock: Callable[[], float] = time.monotonic) -> None:
        self._sock = sock
        self._clock = clock
        self._buf = bytearray()
        self.deadline = math.inf

    def buffered(self) -> int:
        return len(self._buf)

    def peek(self, limit: int) -> bytes:
        return bytes(self._buf[:limit])

    def wait_for_data(self, timeout: float) -> bool:
        """True once at least one byte is buffered; False on end of input, a reset or timeout."""
        if self._buf:
            return True
        try:
            self._recv(timeout)
        except (ReadTimeout, ClientGone):
            return False
        return True

    def readline(self, limit: int, too_long: BadRequest) -> bytes:
        """The next line with its LF, at most limit bytes; too_long is raised past that."""
        scanned = 0
        while True:
            end = self._buf.find(b"\n", scanned, limit)
            if end >= 0:
                return self._take(end + 1)
            if len(self._buf) >= limit:
                raise too_long
            scanned = len(self._buf)
            self._fill()

    def read_exact(self, size: int) -> bytes:
        while len(self._buf) < size:
            self._fill()
        return self._take(size)

    def _take(self, size: int) -> bytes:
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def _fill(self) -> None:
        self._recv(self.deadline - self._clock())

    def _recv(self, timeout: float) -> None:
        if timeout <= 0:
            raise ReadTimeout()
        self._sock.settimeout(None if math.isinf(timeout) else timeout)
        try:
            data = self._sock.recv(RECV_SIZE)
        except socket.timeout:  # before OSError: on 3.9 it is one
            raise ReadTimeout() from None
        except OSError:
            raise ClientGone() from None
        if not data:
            raise ClientGone()
        self._buf += data


@dataclass(frozen=True)
class Head:
    method: str
    target: str  # as sent, query included (visible ASCII only)
    version: Tuple[int, int]
    headers: Tuple[Tuple[str, str], ...]  # (lower-case name, value), in order
    size: int  # bytes of the head, for the trailer budget

    @property
    def endpoint(self) -> str:
        return self.target.split("?", 1)[0]

    def values(self, name: str) -> List[str]:
        return [value for key, value in self.headers if key == name]

    def tokens(self, name: str) -> List[str]:
        """A comma-separated header's elements, lower-cased, over all its lines."""
        return [t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()]

    @property
    def keep_alive(self) -> bool:
        connection = self.tokens("connection")
        if self.version >= (1, 1):
            return "close" not in connection
        return "keep-alive" in connection


def _strip_eol(line: bytes) -> bytes:
    """A line without its LF or CRLF (one of them: a stray CR stays, to be refused)."""
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def _line_text(line: bytes) -> str:
    return _strip_eol(line).decode("latin-1")  # latin-1: every byte is one character


def read_head(reader: Reader) -> Head:
    """The request line and headers; BadRequest for anything malformed or over a bound."""
    try:
        raw = reader.readline(MAX_REQUEST_LINE, BadRequest(
            414, f"request line over {MAX_REQUEST_LINE} bytes; plugin endpoints are short paths"))
    except BadRequest as exc:
        parts = reader.peek(MAX_REQUEST_LINE).decode("latin-1").split(" ", 2)
        exc.target = parts[1] if len(parts) > 1 else ""
        raise
    method, target, version = _request_line(_line_text(raw))
    size = len(raw)
    headers: List[Tuple[str, str]] = []
    while True:
        raw = reader.readline(MAX_HEAD - size, BadRequest(
            431, f"request head over {MAX_HEAD} bytes; Docker sends a few hundred", target))
        size += len(raw)
        line = _line_text(raw)
        if not line:
            break
        if len(headers) >= MAX_HEADERS:
            raise BadRequest(431, f"more than {MAX_HEADERS} request headers", target)
        headers.append(_header(line, target))
    return Head(method, target, version, tuple(headers), size)


def _request_line(line: str) -> Tuple[str, str, Tuple[int, int]]:
    parts = line.split(" ")
    target = parts[1] if len(parts) > 1 else ""
    usage = "malformed request line; send 'POST /<endpoint> HTTP/1.1'"
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise BadRequest(400, usage, target)
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        raise BadRequest(400, usage, target)
    if version.group(1) != "1":
        raise BadRequest(505, f"HTTP version {shown(parts[2])} is not supported; send HTTP/1.1", target)
    if not _TARGET_OK.fullmatch(target):
        raise BadRequest(400, "request target is not a path of visible ASCII characters; "
                              "send /Plugin.Activate or /VolumeDriver.<method>", target)
    return parts[0], target, (int(version.group(1)), int(version.group(2)))


def _header(line: str, target: str) -> Tuple[str, str]:
    if line[0] in " \t":
        raise BadRequest(400, "folded header lines (starting with a space) are not accepted", target)
    name, colon, value = line.partition(":")
    if not colon or not _TOKEN.fullmatch(name):
        raise BadRequest(400, f"malformed header line {shown(line)}; send 'Name: value'", target)
    value = value.strip(" \t")
    if _FIELD_CTL.search(value):
        raise BadRequest(400, f"header {shown(name)} holds control characters", target)
    return name.lower(), value


def content_length(head: Head, max_body: int) -> Optional[int]:
    """The body's length; None for a chunked body. BadRequest for ambiguous framing."""
    codings = head.tokens("transfer-encoding")
    lengths = {v.strip() for line in head.values("content-length") for v in line.split(",")}
    if head.values("transfer-encoding"):
        if lengths:  # two framings: one reader could pick the other (request smuggling)
            raise BadRequest(400, "both Transfer-Encoding and Content-Length sent; send one", head.target)
        if codings != ["chunked"]:
            raise BadRequest(501, f"transfer coding {shown(', '.join(codings))} is not supported; "
                                  "send chunked or Content-Length", head.target)
        return None
    if not lengths:
        return 0
    if len(lengths) != 1:
        raise BadRequest(400, "Content-Length sent with different values", head.target)
    text = lengths.pop()
    if not _DIGITS.fullmatch(text):
        raise BadRequest(400, f"Content-Length {shown(text)} is not a decimal number", head.target)
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(max_body)) or int(digits) > max_body:
        raise too_large(max_body, head.target)
    return int(digits)


def too_large(max_body: int, target: str) -> BadRequest:
    return BadRequest(413, f"request body over {max_body} bytes; Docker never sends one this large", target)


def read_body(reader: Reader, head: Head, max_body: int, send_continue: Callable[[], None]) -> bytes:
    """The whole body, at most max_body bytes, by Content-Length or chunked."""
    length = content_length(head, max_body)
    expect = head.tokens("expect")
    if expect:
        if expect != ["100-continue"]:
            raise BadRequest(417, f"Expect {shown(', '.join(expect))} is not supported", head.target)
        if head.version >= (1, 1) and length != 0:
            send_continue()  # curl waits a second for this before sending a larger body
    if length is None:
        return _read_chunked(reader, head, max_body)
    return reader.read_exact(length)


def _read_chunked(reader: Reader, head: Head, max_body: int) -> bytes:
    parts: List[bytes] = []
    total = 0
    while True:
        line = reader.readline(MAX_CHUNK_LINE, BadRequest(
            400, f"chunk size line over {MAX_CHUNK_LINE} bytes", head.target))
        line = _strip_eol(line)
        size_text, semicolon, extensions = line.partition(b";")
        if semicolon:
            size_text = size_text.rstrip(b" \t")  # whitespace may precede an extension, nothing else
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise BadRequest(400, f"chunk size {shown(size_text.decode('latin-1'))} is not 1 to "
                                  f"{MAX_CHUNK_DIGITS} hex digits", head.target)
        if _EXT_CTL.search(extensions):
            raise BadRequest(400, "chunk extension holds control characters", head.target)
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > max_body:
            raise too_large(max_body, head.target)
        parts.append(reader.read_exact(size))
        end = reader.read_exact(1)
        if end == b"\r":
            end = reader.read_exact(1)
        if end != b"\n":
            raise BadRequest(400, "chunk data is not followed by CRLF (a wrong chunk size?)", head.target)
    _skip_trailers(reader, head)
    return b"".join(parts)


def _skip_trailers(reader: Reader, head: Head) -> None:
    """Trailers are read and dropped, within what is left of the head's budget."""
    budget = MAX_HEAD - head.size
    for _ in range(MAX_HEADERS + 1):
        line = reader.readline(max(budget, 0), BadRequest(
            431, f"chunked trailers over the {MAX_HEAD}-byte head limit", head.target))
        budget -= len(line)
        if not _strip_eol(line):
            return
    raise BadRequest(431, f"more than {MAX_HEADERS} trailer lines", head.target)
