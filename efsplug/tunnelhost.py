"""One stunnel process serving many tunnels: a section each, added and removed by SIGHUP.

With `[efsplug] tunnel_process = shared`, the tunnels of one network namespace are
sections of shared stunnel processes instead of a process each, up to
`tunnels_per_process` (8) in each: a section costs about 60 KiB where a process costs
about 2 MiB. Each tunnel keeps its own port, config section (the mount
directory's stunnel.conf, written by stunnel.render_service), certificate and record; the
record's `tunnel` is the shared process and its `host_config` that process's config.

Under the state directory, per host (one per network namespace and stunnel binary, and
more once one serves `tunnels_per_process` tunnels):

    hosts/<key>-<n>/host.conf   stunnel.render_host: `include = .../services`
    hosts/<key>-<n>/services/<port>.conf -> ../../../<mount dir>/stunnel.conf
    hosts/<key>-<n>/host.json   the running process's TunnelIdentity
    hosts/<key>-<n>/stunnel.log its output (cut back when it grows past _LOG_CAP)
    hosts/<key>-<n>/lock        held while a section is added or removed, or the process started

stunnel re-reads every section on SIGHUP and rebinds every listening port; connections
already made stay as they are (tests/bed/test_stunnel_reload_guest.py proves it under NFS
I/O). A reload that fails (a section stunnel refuses) leaves the process on its old
configuration, so a bad section never takes the others down: it is removed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, List, Optional, Sequence, Set, Tuple

from efsplug import ports, state
from efsplug.fsutil import atomic_write, ensure_dir
from efsplug.stunnel import render_host
from efsplug.tunnel import Tunnel, TunnelError, TunnelIdentity, StartLog, listening_on

HOSTS_DIR = "hosts"
LOCK_TIMEOUT = 15.0  # a holder keeps it until a start or reload listens (ready timeout 10 s)
_LOG_CAP = 1024 * 1024  # every reload logs a few lines per section
_MAX_IDENTITY = 64 * 1024
_KEY = re.compile(r"[0-9a-f]{16}-[0-9]{1,6}")
_LINK_NAME = re.compile(r"([0-9]{1,5})\.conf")
_SERVICE_NAMED = re.compile(r"Service \[efs-([0-9]{1,5})\]")
_MAX_SKIPPED = 16  # hosts place() passes over before it gives up
_RELOAD_FAILED = "Failed to reload the configuration file"
# stunnel's configuration errors: "[!] ..." while it starts, "LOG3[ui]: ..." once it logs
# ("[ui]": configuration, not one of its connections).
_ERROR_LINE = re.compile(r"^\[!\] |LOG[0-3]\[ui\]: ")


@dataclass(frozen=True)
class Host:
    """Where one shared stunnel process keeps its files."""

    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / "host.conf"

    @property
    def services(self) -> Path:
        return self.directory / "services"

    @property
    def identity_file(self) -> Path:
        return self.directory / "host.json"

    @property
    def log(self) -> Path:
        return self.directory / "stunnel.log"

    def link(self, port: int) -> Path:
        return self.services / f"{int(port)}.conf"


def host_for(state_dir: Path, netns: Optional[str], binary: str, capacity: int,
             skip: AbstractSet[Host] = frozenset()) -> Host:
    """A host for one more tunnel of this network namespace (None: the host's own) run by
    binary: the first with fewer than capacity sections.

    Every reload re-reads every section (about 2.5 ms each), and a kill -9 takes all of a
    process's tunnels down at once, so a process serves a bounded number. Two mounts
    choosing at the same moment may both pick the last free place: one section too many
    costs a little reload time, nothing else. Hosts in skip are passed over.
    """
    key = hashlib.sha256(json.dumps([netns, binary]).encode()).hexdigest()[:16]
    base = Path(state_dir) / HOSTS_DIR
    slot = 0
    while True:
        host = Host(base / f"{key}-{slot}")
        if host in skip:
            slot += 1
            continue
        try:
            used = sum(1 for _ in host.services.iterdir())
        except FileNotFoundError:
            return host
        if used < capacity:
            return host
        slot += 1


def host_of_config(state_dir: Path, host_config: str) -> Optional[Host]:
    """The host whose config a record names, if that lies where efsplug puts hosts."""
    path = Path(host_config)
    base = Path(os.path.realpath(state_dir)) / HOSTS_DIR
    if path.name != "host.conf" or not _KEY.fullmatch(path.parent.name) \
            or os.path.realpath(path.parent.parent) != str(base):
        return None
    return Host(path.parent)


def is_host_cmdline(cmdline: Sequence[str], state_dir_real: str) -> bool:
    """cmdline is `stunnel <state_dir>/hosts/<key>-<n>/host.conf`."""
    if len(cmdline) != 2:
        return False
    directory, name = os.path.split(cmdline[1])
    parent, key = os.path.split(directory)
    return name == "host.conf" and bool(_KEY.fullmatch(key)) \
        and os.path.realpath(parent) == os.path.join(state_dir_real, HOSTS_DIR)


class SectionRefused(TunnelError):
    """stunnel refused sections: their ports, as its log names them (empty: it did not say)."""

    def __init__(self, message: str, ports: AbstractSet[int]) -> None:
        super().__init__(message)
        self.ports = frozenset(ports)


def place(state_dir: Path, netns: Optional[str], binary: str, capacity: int, port: int, section: Path, *,
          ready_timeout: float = 10.0) -> Tuple[Host, TunnelIdentity]:
    """Serve section (accepting on port) from a host with room: host_for's, or the next one
    if that process cannot reload because stunnel now refuses another of its sections (say
    its certificate file went): a broken neighbour never fails this mount."""
    skip: Set[Host] = set()
    while True:
        host = host_for(state_dir, netns, binary, capacity, skip)
        try:
            return host, add(host, port, section, binary=binary, netns=netns, ready_timeout=ready_timeout)
        except SectionRefused as exc:
            if not exc.ports or port in exc.ports or len(skip) >= _MAX_SKIPPED:
                raise
            skip.add(host)


def add(host: Host, port: int, section: Path, *, binary: str, netns: Optional[str],
        ready_timeout: float = 10.0) -> TunnelIdentity:
    """Serve section (a file stunnel.render_service wrote, accepting on port) from host.

    Starts the host process if none runs, else reloads it; returns once it listens on
    port. On failure the section is taken out again and TunnelError raised.
    """
    with _locked(host):
        _prepare(host)
        return _serve_section(host, port, section, binary=binary, netns=netns, timeout=ready_timeout)


def remove(host: Host, port: Optional[int], stop_timeout: float = 5.0) -> None:
    """Stop serving port; the process stops with its last section. None: just stop it if
    it has no section left (a remove cut short by a crash)."""
    with _locked(host):
        if port is not None:
            host.link(port).unlink(missing_ok=True)
        _prune(host)
        live = running(host)
        if live is None:
            return
        if any(host.services.iterdir()):
            _hup(live)
            return
        Tunnel(live).stop(stop_timeout)
        host.identity_file.unlink(missing_ok=True)


def ensure(host: Host, port: int, section: Path, *, binary: str, netns: Optional[str],
           timeout: float = 10.0) -> TunnelIdentity:
    """The supervisor's restart: a process of this host listening on port, started or
    reloaded if need be (section linked in again if its link went). Several tunnels of a
    killed host each call this: the first one starts the process, the others find it
    listening."""
    if not section.is_file():
        raise TunnelError(f"tunnel section {section} is gone")
    with _locked(host):
        live = running(host)
        if live is not None and listening_on(live.pid, port):
            return live
        _prepare(host)
        return _serve_section(host, port, section, binary=binary, netns=netns, timeout=timeout)


@dataclass(frozen=True)
class Section:
    """A tunnel a host serves: its port, and the mount directory its section lives in."""

    port: int
    stem: str
    age: float  # seconds since it was added


def hosts(state_dir: Path) -> List[Host]:
    try:
        names = sorted(os.listdir(Path(state_dir) / HOSTS_DIR))
    except OSError:
        return []
    return [Host(Path(state_dir) / HOSTS_DIR / n) for n in names if _KEY.fullmatch(n)]


def sections(host: Host, now: float) -> List[Section]:
    """The sections linked into host (now: time.time()); links efsplug did not make are skipped."""
    found = []
    try:
        entries = list(host.services.iterdir())
    except OSError:
        return []
    for entry in entries:
        named = _LINK_NAME.fullmatch(entry.name)
        try:
            target = os.readlink(entry)
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        parts = Path(target).parts
        if named and len(parts) == 5 and parts[:3] == ("..", "..", "..") and parts[4] == "stunnel.conf":
            found.append(Section(int(named.group(1)), parts[3], age))
    return found


def _serve_section(host: Host, port: int, section: Path, *, binary: str, netns: Optional[str],
                   timeout: float) -> TunnelIdentity:
    """Link section in and have the host listen on port; on failure, unlink it again and
    leave the process on the sections that worked."""
    _link(host.link(port), section)
    try:
        return _serve(host, port, binary=binary, netns=netns, timeout=timeout)
    except BaseException:
        host.link(port).unlink(missing_ok=True)
        live = running(host)
        if live is not None:
            try:
                _hup(live)  # back to the sections that worked
            except TunnelError:
                pass  # it went meanwhile: its tunnels' own restarts bring it back; the error to tell is the first
        raise


def _serve(host: Host, port: int, *, binary: str, netns: Optional[str], timeout: float) -> TunnelIdentity:
    _cap_log(host)
    live = running(host)
    if live is not None:
        log = StartLog(host.log, host.directory)
        try:
            _hup(live)
            _wait_listening(live, port, timeout, log)
        finally:
            log.file.close()
        return live
    try:
        return _launch(host, port, binary=binary, netns=netns, timeout=timeout)
    except SectionRefused as exc:
        others = exc.ports - {port}
        if port in exc.ports or not others:
            raise
    # Sections of other tunnels that stunnel now refuses (their files went) would keep
    # every tunnel of this process down: they are left out, and their own restarts fail alone.
    for other in others:
        host.link(other).unlink(missing_ok=True)
    return _launch(host, port, binary=binary, netns=netns, timeout=timeout)


def _launch(host: Host, port: int, *, binary: str, netns: Optional[str], timeout: float) -> TunnelIdentity:
    start = _size(host.log)
    try:
        identity = Tunnel.launch(host.config, port, stunnel_binary=binary, ready_timeout=timeout, netns=netns,
                                 log_path=host.log).identity
    except TunnelError as exc:
        raise SectionRefused(str(exc), refused_ports(_read_from(host.log, start))) from None
    atomic_write(host.identity_file, json.dumps(state.identity_dict(identity)).encode(), 0o600)
    return identity


def _wait_listening(identity: TunnelIdentity, port: int, timeout: float, log: StartLog) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not listening_on(identity.pid, port):
        said = log.tail()
        if not identity.running() or _RELOAD_FAILED in said:
            what = "exited while reloading" if not identity.running() else "refused the new section"
            raise SectionRefused(f"the shared stunnel (pid {identity.pid}) {what}: {reload_errors(said)}",
                                 refused_ports(said))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TunnelError(f"the shared stunnel did not listen on 127.0.0.1:{port} within {timeout:g}s "
                              f"after a reload: {reload_errors(said)}")
        # No event tells that a reload finished; polling backs off to 20 ms.
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def reload_errors(text: str) -> str:
    """stunnel's error lines (LOG3 and worse) since a reload, on one line (pure)."""
    found = [line.split("]: ", 1)[1].strip() for line in text.splitlines()
             if _ERROR_LINE.search(line) and "]: " in line and _RELOAD_FAILED not in line]
    return "; ".join(found) if found else "no output"


def refused_ports(text: str) -> Set[int]:
    """The ports of the sections stunnel's configuration errors name (pure)."""
    return {int(m.group(1)) for line in text.splitlines() if _ERROR_LINE.search(line)
            for m in _SERVICE_NAMED.finditer(line)}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(min(offset, _size(path)))
            return f.read(_LOG_CAP).decode(errors="replace")
    except OSError:
        return ""


def _hup(identity: TunnelIdentity) -> None:
    Tunnel(identity).reload()


class _locked:
    """The host's lock, held within LOCK_TIMEOUT or TunnelError."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.fd: Optional[int] = None

    def __enter__(self) -> "_locked":
        ensure_dir(self.host.directory, 0o700)
        self.fd = ports.lock_within(self.host.directory / "lock", LOCK_TIMEOUT)
        if self.fd is None:
            raise TunnelError(f"{self.host.directory} stayed locked for {LOCK_TIMEOUT:g}s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _prepare(host: Host) -> None:
    ensure_dir(host.services, 0o700)
    config = render_host(str(host.services)).encode()
    try:
        current = host.config.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != config:
        atomic_write(host.config, config, 0o600)
    _prune(host)


def _link(link: Path, section: Path) -> None:
    """Point link at section, replacing atomically whatever is there."""
    temp = link.with_name(f".{link.name}.tmp")
    temp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(section, link.parent), temp)
    os.replace(temp, link)


def _prune(host: Host) -> None:
    """Drop links whose mount directory is gone (a mount killed before it cleaned up)."""
    try:
        entries = list(host.services.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_symlink() and not entry.exists():
            entry.unlink(missing_ok=True)


def _cap_log(host: Host) -> None:
    try:
        if host.log.stat().st_size > _LOG_CAP:
            os.truncate(host.log, 0)  # stunnel writes with O_APPEND: it goes on at the new end
    except FileNotFoundError:
        pass


def running(host: Host) -> Optional[TunnelIdentity]:
    """The host's process if it runs (its recorded identity still matches)."""
    try:
        with open(host.identity_file, "rb") as f:
            identity = state.parse_identity(json.loads(f.read(_MAX_IDENTITY)))
    except (OSError, ValueError, state.StateError):
        return None
    # Only the process started on this very config counts: a recycled pid never matches.
    if identity is None or identity.cmdline[1:] != (str(host.config),) or not identity.running():
        return None
    return identity
