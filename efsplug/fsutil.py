"""Crash-safe file writes shared by every state writer in efsplug.

A reader must see either the old file or the complete new one, never a torn write, even
after a power cut: write a temp file in the same directory, fsync it, rename it over the
target, then fsync the directory so the rename itself is durable.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import List, Union


TEMP_SUFFIX = ".tmp"
_TEMP_PREFIX = "."

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace path with data atomically; the file has exactly mode (umask ignored)."""
    target = Path(path)
    directory = target.parent
    # The writer's pid in the name lets leftover_temp_files() tell a crashed writer's
    # debris from a write in progress.
    tmp = directory / f"{_TEMP_PREFIX}{target.name}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed (or the caller widened) it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: PathLike) -> None:
    """Make renames and unlinks in directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: PathLike, mode: int) -> Path:
    """Create path (and parents) if needed and give it exactly mode; returns it."""
    p = Path(path)
    p.mkdir(mode=mode, parents=True, exist_ok=True)
    if p.is_symlink() or not p.is_dir():
        raise NotADirectoryError(f"{p} is not a directory")
    # mkdir honours the umask and leaves an existing directory alone; state directories
    # must have the configured mode either way.
    os.chmod(p, mode)
    return p


def is_temp_name(name: str) -> bool:
    """True for the names atomic_write uses for its temp files."""
    return name.startswith(_TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def leftover_temp_files(directory: PathLike) -> List[Path]:
    """Temp files in directory whose writer process is gone (safe to delete)."""
    found = []
    for entry in Path(directory).iterdir():
        if not is_temp_name(entry.name):
            continue
        parts = entry.name[: -len(TEMP_SUFFIX)].split(".")
        try:
            writer = int(parts[-2])
        except (IndexError, ValueError):
            found.append(entry)  # not ours, but in our namespace: debris
            continue
        # A live writer (another thread of ours included) may still rename it; with a
        # recycled pid we keep the file, which is merely conservative.
        if not pid_exists(writer):
            found.append(entry)
    return found


def pid_exists(pid: int) -> bool:
    """A process with this pid exists (signal 0; EPERM means it does, as someone else's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True
