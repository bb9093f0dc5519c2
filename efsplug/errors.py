"""Errors users see: one line that names the cause and the fix.

Messages carry no program prefix: the front end adds its own ("mount.efs: " for
the mount helper, the Docker plugin returns the bare text in ``Err``), because
the same parsers serve both.
"""

from __future__ import annotations

# mount(8) exit statuses a helper is expected to use.
EXIT_USAGE = 1
EXIT_SYSTEM = 2
EXIT_MOUNT_FAILURE = 32

_MAX_SHOWN = 80


def shown(value: object, limit: int = _MAX_SHOWN) -> str:
    """A user-supplied value made safe to print: quoted, control characters escaped, bounded.

    Values can come from hostile option strings; echoing them raw could forge
    extra log lines or terminal escapes.
    """
    text = str(value)
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}.get(ch, f"\\x{code:02x}"))
        else:
            out.append(ch)
    escaped = "".join(out)
    if len(escaped) > limit:
        escaped = escaped[: limit - 3] + "..."
    return f"'{escaped}'"


class EfsplugError(Exception):
    """Base of every error meant for the user; ``str(err)`` is one line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        # Guarantee the one-line promise even if a caller formats something odd.
        one_line = " ".join(message.split("\n")).replace("\r", " ").strip()
        super().__init__(one_line)

    @property
    def message(self) -> str:
        return str(self)


class UsageError(EfsplugError):
    """Bad device, options or arguments (mount(8) status 1)."""

    exit_code = EXIT_USAGE


class ConfigError(EfsplugError):
    """Bad configuration file value (mount(8) status 1)."""

    exit_code = EXIT_USAGE


class MountFailure(EfsplugError):
    """The mount itself could not be made (mount(8) status 32)."""

    exit_code = EXIT_MOUNT_FAILURE
