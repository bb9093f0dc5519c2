"""Processes the bed starts: each in its own process group, tagged so a leak can be found.

Every process the bed starts gets EFSBED_TAG in its environment; its descendants inherit
it. `tagged_processes(tag)` finds whatever is still alive after a stop, which is how the
suite proves that nothing outlives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, List, Mapping, Optional, Sequence, Set, TypeVar, Union

import psutil

TAG_ENV = "EFSBED_TAG"

# Every tag this Python process started something under: the session's leak check reads it.
STARTED_TAGS: Set[str] = set()


def new_tag() -> str:
    return "efsbed-" + uuid.uuid4().hex[:12]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host (the bed's services bind it straight after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class BedProcess:
    name: str
    popen: subprocess.Popen
    log: Optional[Path] = None
    _stdin: Optional[IO[bytes]] = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after timeout."""
        if self._stdin is not None:
            try:
                self._stdin.close()
            except OSError:
                pass
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; members of its group may still be dying (a killed
            # user-mode Linux takes a moment to take its host processes down).
            if self._group_gone(wait):
                return
        # Last resort for members that ignored SIGKILL's predecessor.
        for p in _group_members(self.popen.pid):
            try:
                p.kill()
            except psutil.Error:
                pass
        self._group_gone(5.0)

    def _group_gone(self, timeout: float) -> bool:
        try:
            wait_until(lambda: not _group_members(self.popen.pid), timeout, f"{self.name}'s process group to exit")
            return True
        except TimeoutError:
            return False


class Service:
    """A bed service backed by one tagged process: start() returns self, stop() is idempotent."""

    name = "service"
    _port: Optional[int] = None
    _process: Optional[BedProcess] = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} not started")
        return self._port

    def start(self) -> "Service":
        raise NotImplementedError

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_members(pgid: int) -> List[psutil.Process]:
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def start(
    name: str,
    argv: Sequence[str],
    *,
    tag: str,
    log: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[Union[str, Path]] = None,
    keep_stdin_open: bool = False,
) -> BedProcess:
    """Start argv in a new session (its own process group), tagged with tag."""
    full_env = dict(os.environ if env is None else env)
    full_env[TAG_ENV] = tag
    STARTED_TAGS.add(tag)
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if keep_stdin_open else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        if log:
            out.close()
    return BedProcess(name=name, popen=popen, log=log, _stdin=popen.stdin)


def tagged_processes(tag: str) -> List[psutil.Process]:
    """Live processes (not zombies) whose environment carries tag."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


T = TypeVar("T")


def wait_until(
    cond: Callable[[], T],
    timeout: float,
    what: str = "a condition",
    delay: float = 0.005,
    *,
    process: Optional[BedProcess] = None,
    max_delay: float = 0.2,
) -> T:
    """Poll cond() until it returns something true, and return that; bounded by timeout.

    Back-off from delay up to max_delay between polls (there is no event to wait on: a
    file in another kernel, a log line, a process in the guest). Fails at once if the
    watched process exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited while waiting for {what}:\n{process.log_tail()}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # back-off between polls, bounded by the deadline
        delay = min(delay * 2, max(max_delay, delay))


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    *,
    timeout: float = 20.0,
    process: Optional[BedProcess] = None,
) -> None:
    """Wait until host:port accepts a connection; fail early if process dies first."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited before {host}:{port} accepted:\n{process.log_tail()}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept within {timeout}s")
        time.sleep(delay)  # back-off between connection attempts, not a fixed wait
        delay = min(delay * 2, 0.2)
