"""The kernel's mount table: parse /proc/self/mountinfo and wake up when it changes.

The kernel, not our state files, is the truth about what is mounted. Reading mountinfo
never touches an NFS server (unlike stat() of a mount point), so it cannot hang on a dead
tunnel. poll() on an open mountinfo file reports POLLPRI|POLLERR after any mount or
unmount in this mount namespace, so a watcher sleeps until something changed instead of
re-reading the table on a timer.
"""

from __future__ import annotations

import os
import re
import select
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

MOUNTINFO = "/proc/self/mountinfo"
NFS_TYPES = frozenset({"nfs", "nfs4"})
_OCTAL_BYTES = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class KernelMount:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount options, then the file system's (super block) options
    port: Optional[int]  # `port=` of an nfs/nfs4 mount: the tunnel it talks through

    @property
    def is_nfs(self) -> bool:
        return self.fstype in NFS_TYPES

    def option(self, name: str) -> Optional[str]:
        """Value of `name=value` in options ('' for a bare flag), None when absent."""
        for item in self.options.split(","):
            key, sep, value = item.partition("=")
            if key == name:
                return value if sep else ""
        return None


class MountInfoError(ValueError):
    """A mountinfo line that does not have the kernel's shape."""


def unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as \\040-style octal."""
    if "\\" not in field:
        return field
    # Octal escapes stand for bytes, and the rest of the field was decoded from UTF-8:
    # work in bytes so "\040" next to "ü" gives " ü", not a broken character.
    raw = _OCTAL_BYTES.sub(_byte, field.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "surrogateescape")


def _byte(m: "re.Match[bytes]") -> bytes:
    value = int(m.group(1), 8)
    return bytes([value]) if value < 256 else m.group(0)  # the kernel never writes more than \377


def _port(fstype: str, options: str) -> Optional[int]:
    if fstype not in NFS_TYPES:
        return None
    for item in options.split(","):
        if item.startswith("port="):
            value = item[len("port="):]
            return int(value) if value.isdigit() else None
    return None


def parse_line(line: str) -> KernelMount:
    """One mountinfo line (see proc(5)):

    36 35 98:0 /root /mnt/point rw,noatime master:1 - nfs4 127.0.0.1:/ rw,vers=4.1,port=20049
    """
    fields = line.split(" ")
    try:
        sep = fields.index("-", 6)
        mount_id = int(fields[0])
        mountpoint, mount_options = fields[4], fields[5]
        fstype, source = fields[sep + 1], fields[sep + 2]
        super_options = fields[sep + 3] if len(fields) > sep + 3 else ""
    except (ValueError, IndexError):
        raise MountInfoError(f"not a mountinfo line: {line[:120]!r}") from None
    options = mount_options + ("," + super_options if super_options else "")
    return KernelMount(
        mount_id=mount_id,
        mountpoint=unescape(mountpoint),
        fstype=unescape(fstype),
        source=unescape(source),
        options=options,
        port=_port(fstype, super_options),
    )


def parse_mountinfo(text: str) -> List[KernelMount]:
    """Every mount in a mountinfo text; malformed lines are skipped (never fatal)."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            mounts.append(parse_line(line))
        except MountInfoError:
            continue
    return mounts


def read_mounts(path: str = MOUNTINFO) -> List[KernelMount]:
    with open(path, "rb") as f:
        return parse_mountinfo(f.read().decode("utf-8", "surrogateescape"))


def by_mountpoint(mounts: Iterable[KernelMount]) -> Dict[str, KernelMount]:
    """The visible (last, i.e. topmost) mount at each mount point."""
    return {m.mountpoint: m for m in mounts}


def ports_in_use(mounts: Iterable[KernelMount]) -> Dict[int, List[str]]:
    """Tunnel port -> NFS mount points whose traffic flows through it.

    The kernel puts a second mount of the same NFS server on the first mount's client,
    so a port can carry mounts other than the one it was started for (testbed.md).
    """
    used: Dict[int, List[str]] = {}
    for m in mounts:
        if m.is_nfs and m.port is not None and m.option("addr") in (None, "127.0.0.1"):
            used.setdefault(m.port, []).append(m.mountpoint)
    return used


class MountTableWatch:
    """Wakes when the mount table of this process's mount namespace changes.

    The kernel remembers, per open file, the last change it reported to poll(): each
    change is reported once, and nothing needs re-reading to re-arm the watch.
    """

    EVENTS = select.POLLPRI | select.POLLERR

    def __init__(self, path: str = MOUNTINFO) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, self.EVENTS)

    def fileno(self) -> int:
        return self._fd

    def wait(self, timeout: Optional[float]) -> bool:
        """True if the table changed since the last wait; waits at most timeout seconds
        (None: until a change)."""
        ms = None if timeout is None else max(0, int(timeout * 1000))
        try:
            events = self._poll.poll(ms)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            return False
        return any(ev & self.EVENTS for _, ev in events)

    def read(self) -> List[KernelMount]:
        return read_mounts(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            self._poll.unregister(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "MountTableWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
