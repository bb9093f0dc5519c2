"""Race-free choice of the local port a mount's tunnel listens on.

Two mounts started at the same moment (threads of the supervisor, or separate
`mount.efs` processes) must never pick the same port. A port is taken when
- its lock file under lock_dir is flock()ed by someone (a reservation in progress:
  chosen, tunnel not yet listening), or
- something already listens on 127.0.0.1:<port> (a running tunnel).
flock locks belong to open file descriptions, so they exclude threads of one process
as well as other processes, and the kernel drops them when the holder dies: a crashed
mount leaves no stale reservation behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from efsplug.fsutil import ensure_dir

DEFAULT_LOWER = 20049
DEFAULT_UPPER = 21049  # exclusive
LOCK_DIR_MODE = 0o700


class PortRangeExhausted(RuntimeError):
    """Every port in the range is taken."""

    def __init__(self, lower: int, upper: int, listening: int, reserved: int, excluded: int) -> None:
        self.lower, self.upper = lower, upper
        self.listening, self.reserved, self.excluded = listening, reserved, excluded
        detail = f"{listening} tunnels are running"
        if reserved:
            detail += f", {reserved} ports are being set up by other mounts"
        if excluded:
            detail += f", {excluded} ports are excluded"
        super().__init__(
            f"no free port in {lower}-{upper}: {detail}; widen port_range_upper_bound in "
            "efs-utils.conf or unmount unused file systems"
        )


@dataclass
class PortReservation:
    """A port nobody else will be given until release(); hold it until the tunnel binds."""

    port: int
    lock_path: Path
    _fd: Optional[int] = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the port back (idempotent). Call once the tunnel listens, or failed."""
        if self._fd is None:
            return
        # Unlink while still holding the lock: a waiter that opened the old inode sees
        # it vanish and retries on a fresh file (see _try_lock), so the directory does
        # not fill with one file per port ever used.
        try:
            os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "PortReservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def lock_path_for(lock_dir: Path, port: int) -> Path:
    return Path(lock_dir) / f"port-{port}.lock"


def _try_lock(path: Path) -> Optional[int]:
    """An fd holding an exclusive flock on path, or None if someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        # The previous holder may have unlinked the file between our open and flock:
        # then we locked an orphan inode that nobody else will ever see. Try again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def hold_port(lock_dir: Path, port: int, timeout: float = 0.0) -> Optional[PortReservation]:
    """The lock of a port whose tunnel already runs, or None if not had within timeout.

    Held by a mount joining that tunnel while it checks the tunnel and saves its record,
    and by whoever stops the tunnel while it looks for other records using it: so a
    tunnel is never stopped under a mount that has just joined it. Holders keep it for
    milliseconds; timeout 0 tries once.
    """
    ensure_dir(lock_dir, LOCK_DIR_MODE)
    path = lock_path_for(lock_dir, port)
    fd = lock_within(path, timeout)
    return None if fd is None else PortReservation(port=port, lock_path=path, _fd=fd)


def lock_within(path: Path, timeout: float) -> Optional[int]:
    """An fd holding an exclusive flock on path (created 0600), or None after timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        fd = _try_lock(path)
        if fd is not None:
            return fd
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(delay, remaining))  # flock has no timeout; holders are brief
        delay = min(delay * 2, 0.05)


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True if binding host:port fails the way stunnel's own bind would."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # stunnel binds with SO_REUSEADDR, so connections lingering in TIME_WAIT do not
        # make a port unusable for it; test under the same rule.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def reserve_port(
    lock_dir: Path,
    lower: int = DEFAULT_LOWER,
    upper: int = DEFAULT_UPPER,
    *,
    exclude: Iterable[int] = (),
) -> PortReservation:
    """Reserve a free port in [lower, upper). Raises PortRangeExhausted when none is left.

    The bind check runs in the caller's network namespace; the locks are shared by all
    namespaces, which is conservative for tunnels started in another namespace.
    """
    if not (1 <= lower < upper <= 65536):
        raise ValueError(f"invalid port range {lower}-{upper}: need 1 <= lower < upper <= 65536")
    ensure_dir(lock_dir, LOCK_DIR_MODE)
    excluded = set(exclude)
    ports = list(range(lower, upper))
    # Start at a random place so simultaneous callers do not all fight over `lower`.
    start = random.randrange(len(ports))
    listening = reserved = skipped = 0
    for port in ports[start:] + ports[:start]:
        if port in excluded:
            skipped += 1
            continue
        path = lock_path_for(lock_dir, port)
        fd = _try_lock(path)
        if fd is None:
            reserved += 1
            continue
        reservation = PortReservation(port=port, lock_path=path, _fd=fd)
        try:
            busy = port_is_listening(port)
        except BaseException:
            reservation.release()
            raise
        if not busy:
            return reservation
        listening += 1
        reservation.release()
    raise PortRangeExhausted(lower, upper, listening, reserved, skipped)
