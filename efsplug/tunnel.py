"""A running stunnel client for one mount: start, find again, check, reload, stop.

The tunnel must outlive the process that started it (`mount.efs` exits right after the
mount), so it runs in its own session, with `foreground = yes` so that the pid we hold is
stunnel itself. Later callers find it again by a TunnelIdentity (pid + start time +
command line) so a recycled pid is never mistaken for the tunnel: nothing is signalled
unless all three still match.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Optional, Set, Tuple

from efsplug import procinfo, sockdiag
from efsplug.fsutil import atomic_write
from efsplug.errors import MountFailure
from efsplug.netns import open_namespace, preexec_entering
from efsplug.stunnel import TunnelSpec, render

if TYPE_CHECKING:
    import psutil

_CREATE_TIME_TOLERANCE = 0.005  # psutil derives it from clock ticks (10 ms); same process => equal
_TCP_LISTEN = "0A"
_LOG_TAIL_LINES = 20


class TunnelError(RuntimeError):
    """The tunnel could not be started or controlled."""


@dataclass(frozen=True)
class TunnelIdentity:
    """Who the tunnel process is; a pid alone may since belong to another process."""

    pid: int
    create_time: float  # wall clock; compared only for records that predate start_ticks
    cmdline: Tuple[str, ...]
    # The start in clock ticks since boot, and that boot: what no clock step can move.
    start_ticks: Optional[int] = None
    boot_id: Optional[str] = None

    @classmethod
    def of(cls, pid: int) -> "TunnelIdentity":
        """The identity of the running process pid; psutil.NoSuchProcess if there is none."""
        found = procinfo.facts(pid)
        if found is None or found.zombie:
            import psutil  # only on this failure: mount.efs's own path never needs psutil

            raise psutil.NoSuchProcess(pid)
        return cls(
            pid=pid, create_time=found.create_time, cmdline=found.cmdline,
            start_ticks=found.start_ticks, boot_id=procinfo.boot_id() or None,
        )

    def matches(self, process: "psutil.Process") -> bool:
        """True if process is the very process this identity was taken from."""
        return self.matches_pid(process.pid)

    def running(self) -> bool:
        """True if the very process this identity was taken from still runs (not a zombie)."""
        return self.matches_pid(self.pid)

    def matches_pid(self, pid: int) -> bool:
        found = procinfo.facts(pid)
        return found is not None and not found.zombie and self._started_as(found) and found.cmdline == self.cmdline

    def owns_pid(self) -> bool:
        """True while the pid is still this process's, running, exiting or a zombie (the same
        start time): until it is reaped, the pid cannot be reused."""
        found = procinfo.facts(self.pid)
        return found is not None and self._started_as(found)

    def _started_as(self, found: procinfo.ProcessFacts) -> bool:
        if self.start_ticks is not None and self.boot_id is not None:
            return self.boot_id == procinfo.boot_id() and found.start_ticks == self.start_ticks
        return abs(found.create_time - self.create_time) < _CREATE_TIME_TOLERANCE


class StartLog:
    """Where stunnel's stdout/stderr go, and what it said since this start."""

    def __init__(self, path: Optional[Path], scratch_dir: Path) -> None:
        if path is not None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self.file: IO[bytes] = open(fd, "a+b")
        else:
            self.file = tempfile.TemporaryFile(dir=scratch_dir)
        self.start = self.file.seek(0, os.SEEK_END)  # a shared log holds older runs too

    def tail(self) -> str:
        try:
            self.file.seek(self.start)
            lines = self.file.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def errors(self) -> str:
        """stunnel's own error lines ("[!] ...") on one line: what an operator needs to read."""
        tail = self.tail().splitlines()
        errors = [line.split("[!]", 1)[1].strip() for line in tail if "[!]" in line]
        return "; ".join(errors) if errors else (tail[-1].strip() if tail else "no output")


def _socket_inodes(pid: int) -> Set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def listening_on(pid: int, port: int) -> bool:
    """True if process pid itself listens on 127.0.0.1:port.

    Asked of the kernel over sock_diag when pid is in our network namespace (efsplug.sockdiag:
    far cheaper), else read from /proc/<pid>/net/tcp, which shows the sockets of *that
    process's* namespace (no per-thread setns dance to ask there). Matching the socket
    inode against the process's own descriptors means a different program that happens to hold the port
    is not mistaken for our tunnel. It also sends nothing through the tunnel, so the
    mount target sees no half-opened probe connections.
    """
    if sockdiag.same_namespace(pid):
        asked = sockdiag.loopback_listeners(port)
        if asked is not None:
            try:
                return bool(asked) and bool(asked & _socket_inodes(pid))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                return False
    want = f"0100007F:{port:04X}"
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f, None)  # header
            candidates = set()
            for line in f:
                cols = line.split()
                if len(cols) > 9 and cols[1] == want and cols[3] == _TCP_LISTEN:
                    candidates.add(cols[9])
        if not candidates:
            return False
        return bool(candidates & _socket_inodes(pid))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def catches(pid: int, sig: int) -> bool:
    """True if process pid has a handler installed for sig (SigCgt in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


class Tunnel:
    """One stunnel process serving one mount's local port."""

    def __init__(
        self,
        identity: TunnelIdentity,
        *,
        spec: Optional[TunnelSpec] = None,
        config_path: Optional[Path] = None,
        log_path: Optional[Path] = None,
        popen: Optional["subprocess.Popen[bytes]"] = None,
    ) -> None:
        self.identity = identity
        self.spec = spec
        self.config_path = config_path
        self.log_path = log_path
        self._popen = popen  # set when we are its parent: we must reap it

    def __repr__(self) -> str:
        return f"Tunnel(pid={self.identity.pid}, config={self.config_path})"

    @property
    def pid(self) -> int:
        return self.identity.pid

    @classmethod
    def start(
        cls,
        spec: TunnelSpec,
        *,
        config_path: Path,
        stunnel_binary: str,
        ready_timeout: float = 10.0,
        netns: Optional[str] = None,
        log_path: Optional[Path] = None,
    ) -> "Tunnel":
        """Write the config (0600), start stunnel and wait until it listens.

        On any failure the config written here is removed again before TunnelError.
        """
        config_path = Path(config_path)
        atomic_write(config_path, render(spec).encode(), 0o600)
        try:
            tunnel = cls.launch(config_path, spec.accept_port, stunnel_binary=stunnel_binary,
                                ready_timeout=ready_timeout, netns=netns, log_path=log_path)
        except BaseException:
            config_path.unlink(missing_ok=True)
            raise
        tunnel.spec = spec
        return tunnel

    @classmethod
    def launch(
        cls,
        config_path: Path,
        port: int,
        *,
        stunnel_binary: str,
        ready_timeout: float = 10.0,
        netns: Optional[str] = None,
        log_path: Optional[Path] = None,
    ) -> "Tunnel":
        """Start stunnel on an existing config and wait until it listens on 127.0.0.1:port.

        Used by start() and by the supervisor's restarts. stunnel's output goes to log_path
        (appended) if given, else to an unlinked temp file that only serves to quote its
        reason when it fails to start. On failure the process is killed before TunnelError.
        """
        binary = shutil.which(stunnel_binary)
        if binary is None:
            raise TunnelError(f"stunnel binary {stunnel_binary!r} not found")
        config_path = Path(config_path)
        ns_fd: Optional[int] = None
        if netns is not None:
            try:
                ns_fd = open_namespace(netns)  # never blocks: the supervisor restarts tunnels from records
            except MountFailure as e:
                raise TunnelError(f"cannot open network namespace: {e}") from None
        popen: Optional["subprocess.Popen[bytes]"] = None
        log: Optional[StartLog] = None
        try:
            log = StartLog(log_path, config_path.parent)
            try:
                popen = subprocess.Popen(
                    [binary, str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log.file,
                    stderr=log.file,
                    start_new_session=True,  # survives our exit and our terminal's signals
                    close_fds=True,
                    preexec_fn=preexec_entering(ns_fd),
                )
            except subprocess.SubprocessError:
                # Only the preexec_fn (setns) raises this; the child never ran stunnel.
                raise TunnelError(f"cannot enter network namespace {netns}") from None
            _wait_listening(popen, port, ready_timeout, log)
            # Only now: right after fork+exec /proc/<pid>/cmdline can still be empty (seen under
            # UML), and such an identity would match nothing. Listening means exec is done, and
            # the pid is our unreaped child, so it cannot have been reused meanwhile.
            identity = TunnelIdentity.of(popen.pid)
            return cls(identity, config_path=config_path, log_path=log_path, popen=popen)
        except BaseException:
            if popen is not None:
                _kill_child(popen)
            raise
        finally:
            if ns_fd is not None:
                os.close(ns_fd)
            if log is not None:
                log.file.close()

    @classmethod
    def from_identity(cls, identity: TunnelIdentity) -> Optional["Tunnel"]:
        """The tunnel if that exact process still runs, else None (gone or pid reused)."""
        return cls(identity) if identity.running() else None

    def _running(self) -> bool:
        if self._popen is not None:
            self._popen.poll()  # reap our own child so it does not linger as a zombie
        return self.identity.running()

    def alive(self) -> bool:
        return self._running()

    def listening(self) -> bool:
        """True if the tunnel process itself listens on its port (spec needed)."""
        if self.spec is None:
            raise TunnelError("listening() needs the tunnel's spec")
        return self.alive() and listening_on(self.identity.pid, self.spec.accept_port)

    def reload(self, timeout: float = 2.0) -> None:
        """SIGHUP: stunnel re-reads its config and certificate files; open connections stay.

        stunnel binds its ports before it installs its SIGHUP handler, and until then a
        SIGHUP kills it: a tunnel that has only just started is given until it catches one.
        """
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not catches(self.identity.pid, signal.SIGHUP) and self._running():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TunnelError(f"stunnel pid {self.pid} does not handle SIGHUP after {timeout:g}s")
            time.sleep(min(delay, remaining))  # no event says a handler was installed
            delay = min(delay * 2, 0.02)
        self._signal(signal.SIGHUP, required=True)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after timeout; a no-op if the process is already gone."""
        if not self._signal(signal.SIGTERM, required=False):
            return
        if self._wait_gone(timeout):
            return
        self._signal(signal.SIGKILL, required=False)
        if not self._wait_gone(5.0):
            raise TunnelError(f"stunnel pid {self.pid} survived SIGKILL")

    def _signal(self, sig: int, *, required: bool) -> bool:
        # The identity check and the kill are not atomic, but a pid is only recycled
        # after the tunnel died *and* the pid space wrapped: not within microseconds.
        if not self._running():
            if required:
                raise TunnelError(f"tunnel pid {self.pid} is not running")
            return False
        try:
            os.kill(self.identity.pid, sig)
        except ProcessLookupError:
            if required:
                raise TunnelError(f"tunnel pid {self.pid} is not running") from None
            return False
        return True

    def _wait_gone(self, timeout: float) -> bool:
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        # No Popen of ours (found again from a record): a pidfd becomes readable once the
        # whole process has exited. Only that counts: stunnel is threaded, and its main
        # thread shows as a zombie while the others still wind down, when waitpid cannot
        # reap it yet (and nothing would later). If it is our own child, it is reaped here.
        try:
            fd = os.pidfd_open(self.identity.pid)
        except ProcessLookupError:
            return True
        try:
            if not self.identity.owns_pid():  # checked after opening: the fd is of this very process
                return True  # gone and reaped, the pid taken by another process since
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return False
            try:
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)  # exactly this process, never a reused pid
            except ChildProcessError:
                pass  # another process's child (or reaped already): its parent reaps it
            return True
        finally:
            os.close(fd)


def _wait_listening(popen: "subprocess.Popen[bytes]", port: int, timeout: float, log: StartLog) -> None:
    """Return once stunnel listens on port; raise as soon as it exits or time is up."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if listening_on(popen.pid, port):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TunnelError(
                f"stunnel did not listen on 127.0.0.1:{port} within {timeout:g}s: {log.errors()}"
            )
        # Waiting on the process (not sleeping) returns the moment stunnel exits.
        try:
            rc = popen.wait(min(delay, remaining))
        except subprocess.TimeoutExpired:
            delay = min(delay * 2, 0.02)  # a ready tunnel is noticed within 20 ms
            continue
        raise TunnelError(f"stunnel exited with status {rc} before listening on port {port}: {log.errors()}")


def _kill_child(popen: "subprocess.Popen[bytes]") -> None:
    try:
        popen.kill()
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise
    popen.wait()

