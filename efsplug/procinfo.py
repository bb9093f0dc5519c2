"""A process's start time, command line and liveness straight from /proc.

What TunnelIdentity needs on `mount.efs`'s own path, without importing psutil (a few
milliseconds of every mount). The start time is computed exactly as psutil computes
Process.create_time() on Linux (boot time from /proc/stat plus the start tick over
CLK_TCK), so identities taken here and by psutil compare equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_boot_time: Optional[float] = None


@dataclass(frozen=True)
class ProcessFacts:
    create_time: float
    cmdline: Tuple[str, ...]
    zombie: bool


def boot_time() -> float:
    global _boot_time
    if _boot_time is None:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime"):
                    _boot_time = float(line.split()[1])
                    break
            else:
                raise RuntimeError("/proc/stat has no btime line")
    return _boot_time


def facts(pid: int) -> Optional[ProcessFacts]:
    """None if no such process (or it vanished while being read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in parentheses may hold spaces and ')': the fields follow the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    state, start_ticks = fields[0], int(fields[19])
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    cmdline = tuple(os.fsdecode(arg) for arg in raw.split(b"\0")) if raw else ()
    return ProcessFacts(create_time=boot_time() + start_ticks / _CLK_TCK, cmdline=cmdline, zombie=state == b"Z")
