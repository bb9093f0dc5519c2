"""SIGTERM, SIGINT and SIGHUP during `mount.efs`: undo what the mount made, then exit.

Python's default for SIGTERM and SIGHUP ends the process on the spot: a tunnel, a port
lock, a record and a per-mount directory would be left behind for a mount that never
happened. While armed, these signals raise Interrupted instead, so every undo step runs
(mount.py decides, from the kernel's mount table, whether the mount was already made).
"""

from __future__ import annotations

# The C module under `signal`: the module itself turns every constant into an enum at
# import (enum and all), which a mount.efs handed to a resident efsplug would pay for.
import _signal

from efsplug.errors import MountFailure

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import Any

NAMES = {_signal.SIGTERM: "SIGTERM", _signal.SIGINT: "SIGINT", _signal.SIGHUP: "SIGHUP"}
SIGNALS = tuple(NAMES)
_armed = False


class Interrupted(MountFailure):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    if _armed:
        raise Interrupted(f"interrupted by {NAMES[signum]}; what the mount had made is removed")


def arm() -> None:
    global _armed
    _armed = True
    for sig in SIGNALS:
        _signal.signal(sig, _on_signal)


def disarm() -> None:
    """From now on the signals are noted and ignored: the mount is made and kept."""
    global _armed
    _armed = False
