"""A process's start time, command line and liveness straight from /proc.

What TunnelIdentity needs on `mount.efs`'s own path, without importing psutil (a few
milliseconds of every mount). The start time is computed exactly as psutil computes
Process.create_time() on Linux (boot time from /proc/stat plus the start tick over
CLK_TCK), so identities taken here and by psutil compare equal.

That wall-clock start time moves whenever the clock is stepped (chrony's makestep at
boot, a VM resumed): the kernel's btime is the wall clock minus the time since boot, in
whole seconds, so two processes can read it one second apart. What identifies a process
is therefore its start in clock ticks since boot, within this boot (boot_id).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_boot_time: Optional[float] = None
_boot_id: Optional[str] = None


@dataclass(frozen=True)
class ProcessFacts:
    create_time: float  # wall clock: for ages and display, never for identity
    start_ticks: int  # clock ticks from boot to the process's start: no clock step moves it
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


def is_boot_id(text: str) -> bool:
    """text looks like the kernel's boot_id (a UUID: lower-case hex and dashes)."""
    return 0 < len(text) <= 64 and all(c in "0123456789abcdef-" for c in text)


def boot_id() -> str:
    """This boot's random id (empty if the kernel has none): start ticks compare only within one boot."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                text = f.read(64).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        _boot_id = text if is_boot_id(text) else ""
    return _boot_id


def seconds_running(start_ticks: Optional[int]) -> float:
    """How long a process that started at start_ticks has run, by the boot clock (0.0 if unknown)."""
    if start_ticks is None:
        return 0.0
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / _CLK_TCK)


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
    return ProcessFacts(
        create_time=boot_time() + start_ticks / _CLK_TCK, start_ticks=start_ticks, cmdline=cmdline,
        zombie=state == b"Z",
    )
