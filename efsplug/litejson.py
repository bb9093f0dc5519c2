"""JSON through the interpreter's own C codec (_json), without the json package.

`import json` brings re and enum with it: about 6 ms of a mount.efs that a resident
efsplug prepares, where one request and one answer are all it encodes and decodes. The C
scanner and encoder are what the json package itself runs (CPython always has them);
this module only builds them with the settings efsplug's messages use: strict strings,
no NaN or Infinity, ASCII output, compact separators.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import Any, List

_WHITESPACE = " \t\n\r"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class _Settings:
    """The attributes the C scanner reads from a json.JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constants)


_scan = _json.make_scanner(_Settings())


def loads(text: str) -> Any:
    """json.loads, but NaN and Infinity are errors. ValueError (or RecursionError, for
    absurd nesting) on anything that is not exactly one JSON value."""
    try:
        return _loads(text)
    except SystemError:
        # Python 3.11's scanner reports a malformed string as json.decoder.JSONDecodeError,
        # which it looks up in sys.modules only: before json.decoder is imported, the report
        # itself fails. The real error, then (a rare path: json's cost is paid only here).
        import json.decoder  # noqa: F401

        return _loads(text)


def _loads(text: str) -> Any:
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"no JSON value at offset {stop.value}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after the JSON value at offset {end}")
    return value


def _not_json(value: object) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> str:
    """json.dumps(value, separators=(",", ":"), allow_nan=False), byte for byte."""
    # A new encoder per call: its circular-reference markers must start empty.
    encode = _json.make_encoder({}, _not_json, _json.encode_basestring_ascii, None, ":", ",", False, False, False)
    chunks: List[str] = encode(value, 0)
    return "".join(chunks)
