"""Tunnel processes as the supervisor sees them: restart one, watch for deaths, probe listeners.

A restart runs the very command line the record holds (stunnel and its config file
under the state directory), so the tunnel comes back on the same port with the same
configuration; the NFS client reconnects to that port and the hard mount resumes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import psutil

from efsplug import tunnelhost
from efsplug.state import MountRecord
from efsplug.tunnel import Tunnel, TunnelError, TunnelIdentity, listening_on

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


def start_tunnel(record: MountRecord, state_dir: Path, default_binary: str, *,
                 timeout: float = READY_TIMEOUT) -> TunnelIdentity:
    """Start the record's stunnel again (in its network namespace) and wait until it listens.

    If one already serves that config and port, it is adopted instead of started twice.
    """
    binary, config = restart_argv(record, state_dir, default_binary)
    running = find_running(record, state_dir)
    if running is not None:
        return running
    assert record.port is not None
    # The supervisor reaps the child itself when its pidfd fires (reap_child).
    return Tunnel.launch(Path(config), record.port, stunnel_binary=binary, ready_timeout=timeout,
                         netns=record.netns).identity


def serve_hosted(record: MountRecord, state_dir: Path, default_binary: str, *,
                 timeout: float = READY_TIMEOUT) -> TunnelIdentity:
    """A record's tunnel in a shared stunnel process: that process if it listens on the
    record's port, else reloaded, or started again (the first of its tunnels to ask)."""
    assert record.host_config is not None
    host = tunnelhost.host_of_config(state_dir, record.host_config)
    section = record.config_file
    if host is None or record.port is None or section is None or not _inside(section, state_dir):
        raise TunnelError(f"the record of {record.mountpoint} names no shared tunnel under {state_dir}")
    recorded = list(record.tunnel.cmdline) if record.tunnel else []
    binary = recorded[0] if recorded and is_stunnel(recorded) else default_binary
    return tunnelhost.ensure(host, record.port, Path(section), binary=binary, netns=record.netns, timeout=timeout)


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


def pidfds_close(fds: Dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class ListenProbe:
    """"Does this tunnel listen on its port?" for many tunnels, cheaply.

    /proc/<pid>/net/tcp lists every socket of the tunnel's network namespace, so with N
    tunnels in one namespace, probing each separately costs O(N) per tunnel. Tables read
    here are reused for `ttl` seconds for positive answers; a negative answer is always
    confirmed with a fresh read, so a stale table can never get a healthy tunnel restarted.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self._clock = ttl, clock
        self._tables: Dict[int, Tuple[float, Dict[int, Set[str]]]] = {}
        self._sockets: Dict[int, Tuple[float, Set[str]]] = {}
        self._verified: Dict[Tuple[int, int], str] = {}  # (pid, port) -> its listening socket's inode
        self._namespaces: Dict[int, int] = {}  # pid -> network namespace inode (fixed for a pid's life)

    def new_sweep(self) -> None:
        """The next answers read each namespace's table afresh, once per namespace."""
        self._tables.clear()

    def still_listening(self, pid: int, port: int) -> bool:
        """The per-poll check: is the socket verified earlier still listening on port?

        One table read per namespace per sweep and a set lookup per tunnel. Only when the
        known socket is missing (never verified, or re-bound by a reload) does it fall back
        to listening(), which scans the process's descriptors.
        """
        known = self._verified.get((pid, port))
        namespace = self._namespaces.get(pid)
        if known is not None and namespace is not None:
            cached = self._tables.get(namespace)
            if cached is None or self._clock() - cached[0] > self.ttl:
                cached = self._tables[namespace] = (self._clock(), _loopback_listeners(pid))
            if known in cached[1].get(port, ()):
                return True
        return self.listening(pid, port)

    def listening(self, pid: int, port: int) -> bool:
        try:
            namespace = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return False
        if len(self._namespaces) > 8192:  # pids of long-gone tunnels
            self._namespaces.clear()
            self._verified.clear()
        self._namespaces[pid] = namespace
        return self._check(pid, port, namespace, fresh=False) or self._check(pid, port, namespace, fresh=True)

    def _check(self, pid: int, port: int, namespace: int, *, fresh: bool) -> bool:
        now = self._clock()
        cached = self._tables.get(namespace)
        if fresh or cached is None or now - cached[0] > self.ttl:
            cached = self._tables[namespace] = (now, _loopback_listeners(pid))
        candidates = cached[1].get(port)
        if not candidates:
            return False
        sockets = self._sockets.get(pid)
        if fresh or sockets is None or now - sockets[0] > self.ttl:
            sockets = self._sockets[pid] = (now, _socket_inodes(pid))
        if len(self._sockets) > 4096:  # pids of long-gone tunnels
            self._sockets = {pid: sockets}
        mine = candidates & sockets[1]
        if mine:
            self._verified[(pid, port)] = next(iter(mine))
        return bool(mine)


def _loopback_listeners(pid: int) -> Dict[int, Set[str]]:
    """port -> socket inodes listening on 127.0.0.1:port in pid's network namespace."""
    found: Dict[int, Set[str]] = {}
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f, None)
            for line in f:
                cols = line.split(None, 10)  # up to the inode; a line has ~17 fields, read every poll
                if len(cols) > 9 and cols[3] == "0A" and cols[1].startswith("0100007F:"):
                    found.setdefault(int(cols[1][9:], 16), set()).add(cols[9])
    except OSError:
        pass
    return found


def _socket_inodes(pid: int) -> Set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes
