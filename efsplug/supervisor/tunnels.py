"""Tunnel processes as the supervisor sees them: restart one, watch for deaths, find orphans.

A restart runs the very command line the record holds (stunnel and its config file
under the state directory), so the tunnel comes back on the same port with the same
configuration; the NFS client reconnects to that port and the hard mount resumes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import psutil

from efsplug.netns import netns_path, preexec_entering
from efsplug.state import MountRecord
from efsplug.tunnel import TunnelError, TunnelIdentity, listening_on

READY_TIMEOUT = 10.0


def _inside(path: str, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real != base and os.path.commonpath([base, real]) == base


def is_stunnel(cmdline: Iterable[str]) -> bool:
    args = list(cmdline)
    return bool(args) and os.path.basename(args[0]).startswith("stunnel")


def restart_argv(record: MountRecord, state_dir: Path, default_binary: str) -> List[str]:
    """stunnel on the record's own config file (which must live under state_dir).

    The recorded command line names the binary; if it was captured badly (a pid read
    before exec finished shows no command line), the configured binary is used.
    """
    config = record.config_file
    if config is None or not _inside(config, state_dir):
        raise TunnelError(f"the record of {record.mountpoint} has no tunnel config under {state_dir}")
    if not os.path.exists(config):
        raise TunnelError(f"tunnel config {config} is gone")
    recorded = list(record.tunnel.cmdline) if record.tunnel else []
    binary = recorded[0] if recorded and is_stunnel(recorded) else default_binary
    return [binary, config]


def find_running(record: MountRecord, state_dir: Path) -> Optional[TunnelIdentity]:
    """A live stunnel already serving the record's config and port (one we lost track of)."""
    if record.config_file is None or record.port is None:
        return None
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = p.info.get("cmdline") or []
        if len(cmdline) == 2 and is_stunnel(cmdline) and cmdline[1] == record.config_file:
            if listening_on(p.info["pid"], record.port):
                try:
                    return TunnelIdentity.of(p.info["pid"])
                except psutil.Error:
                    return None
    return None


def start_tunnel(record: MountRecord, state_dir: Path, default_binary: str, *, timeout: float = READY_TIMEOUT
                 ) -> Tuple[TunnelIdentity, "Optional[subprocess.Popen[bytes]]"]:
    """Start the record's stunnel again (in its network namespace) and wait until it listens.

    If one already serves that config and port, it is adopted instead of started twice.
    """
    argv = restart_argv(record, state_dir, default_binary)
    running = find_running(record, state_dir)
    if running is not None:
        return running, None
    assert record.port is not None
    ns_fd = None
    if record.netns:
        try:
            ns_fd = os.open(netns_path(record.netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TunnelError(f"network namespace {record.netns}: {exc.strerror}") from None
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(argv[1])) as log:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                start_new_session=True, preexec_fn=preexec_entering(ns_fd),
            )
            identity = _wait_listening(popen, record.port, timeout, log)
            return identity, popen
    finally:
        if ns_fd is not None:
            os.close(ns_fd)


def _wait_listening(popen: "subprocess.Popen[bytes]", port: int, timeout: float, log) -> TunnelIdentity:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if listening_on(popen.pid, port):
            return TunnelIdentity.of(popen.pid)
        remaining = deadline - time.monotonic()
        try:
            rc = popen.wait(max(min(delay, remaining), 0.001))
        except subprocess.TimeoutExpired:
            if remaining <= 0:
                popen.kill()
                popen.wait()
                raise TunnelError(f"stunnel did not listen on port {port} within {timeout:g}s") from None
            delay = min(delay * 2, 0.1)
            continue
        log.seek(0)
        lines = [line.split("[!]", 1)[1].strip() for line in log.read().decode(errors="replace").splitlines()
                 if "[!]" in line]
        raise TunnelError(f"stunnel exited with status {rc} on port {port}: {'; '.join(lines[-3:]) or 'no output'}")


def open_pidfd(identity: TunnelIdentity) -> Optional[int]:
    """A pidfd for the tunnel (readable once it exits), None if that process is gone.

    Opened first and checked after: if the identity still matches then, the pidfd can
    only refer to that process, never to a later one that reused its pid.
    """
    try:
        fd = os.pidfd_open(identity.pid)
    except (ProcessLookupError, OSError):
        return None
    try:
        process = psutil.Process(identity.pid)
    except psutil.Error:
        os.close(fd)
        return None
    if not identity.matches(process):
        os.close(fd)
        return None
    return fd


def reap_child(pid: int) -> None:
    """Collect the exit status of a tunnel we started ourselves (others are not our children)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclass(frozen=True)
class Orphan:
    identity: TunnelIdentity
    age: float


def find_orphans(state_dir: Path, known: Iterable[TunnelIdentity], now: float) -> List[Orphan]:
    """stunnel processes running a config under state_dir that no record knows."""
    known_set = {(i.pid, i.cmdline) for i in known}
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmdline = p.info.get("cmdline") or []
        if len(cmdline) != 2 or not is_stunnel(cmdline) or not _inside(cmdline[1], state_dir):
            continue
        if (p.info["pid"], tuple(cmdline)) in known_set:
            continue
        try:
            identity = TunnelIdentity.of(p.info["pid"])
        except psutil.Error:
            continue
        found.append(Orphan(identity, now - identity.create_time))
    return found


def pidfds_close(fds: Dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
