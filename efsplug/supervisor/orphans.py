"""Orphan tunnels: stunnels efsplug started that no mount record owns any more.

The state directory (/var/run/efs) is shared with amazon-efs-utils. Its tunnels run
`stunnel /var/run/efs/stunnel-config.<fs>.<mnt>.<port>` (`efs-proxy` in 2.x and 3.x)
next to its own state files, and its hard mounts hang if such a tunnel is stopped. So a
process is stopped as an orphan only when all of these hold:

- it is provably efsplug's: its command line is exactly `stunnel <state_dir>/<mount
  dir>/stunnel.conf`, the mount directory is named the way efsplug names them
  (state.file_name without `.json`), no symlink lies on the way, and the config's first
  line is the marker efsplug writes (stunnel.MARKER);
- no record names its mount directory: not a good one (looked for right before the
  decision, so a mount in progress is seen), not a corrupt or quarantined one (a mount
  whose record went bad may still be live);
- no kernel mount uses its port (the mount table, read afresh for the decision);
- it has run for at least the minimum age (mount.efs saves the record right after its
  tunnel listens).

judge() decides from those facts (pure); Sweeper gathers them and acts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import psutil

from efsplug import procinfo, state, tunnelhost
from efsplug.mounttable import KernelMount, ports_in_use
from efsplug.stunnel import MARKER
from efsplug.supervisor.tunnels import is_stunnel
from efsplug.tunnel import Tunnel, TunnelError, TunnelIdentity

log = logging.getLogger("efsplug.supervisor")
CONFIG_NAME = "stunnel.conf"  # what mount.efs names a tunnel's config in its mount directory
# state.file_name without ".json": fs id, escaped mount point (letters, digits, : _ . - ~
# and \xNN escapes), optional port. efs-utils' own directories end in "+": never matched.
MOUNT_DIR = re.compile(r"fs-[0-9a-f]{8}(?:[0-9a-f]{9})?\.(?:[A-Za-z0-9:_.~-]|\\x[0-9a-f]{2})+")
_ACCEPT = re.compile(r"^accept = 127\.0\.0\.1:([0-9]{1,5})$", re.MULTILINE)
_STEM_PARTS = re.compile(r"(fs-[0-9a-f]{8}(?:[0-9a-f]{9})?)\..+\.([0-9]{1,5})")  # fs id, port
_MAX_CONFIG = 16 * 1024  # efsplug's configs are well under 2 KiB


@dataclass(frozen=True)
class Candidate:
    """A live stunnel proven efsplug's that no loaded record knows."""

    identity: TunnelIdentity
    stem: str  # its mount directory's name: the record would be <stem>.json
    port: Optional[int]  # the port its config accepts on
    age: float


@dataclass(frozen=True)
class Verdict:
    stop: bool
    reason: str
    recheck_in: Optional[float] = None  # not old enough yet: look again this much later


def judge(c: Candidate, *, claimed: bool, ports_used: Set[int], min_age: float) -> Verdict:
    """Stop the candidate or not. Every doubt keeps it: a live mount may depend on it."""
    if claimed:
        return Verdict(False, f"a record names {c.stem}")
    if c.port is not None and c.port in ports_used:
        return Verdict(False, f"a kernel mount uses port {c.port}")
    if c.age < min_age:
        return Verdict(False, "too young to tell", recheck_in=min_age - c.age)
    return Verdict(True, "no mount record owns it and no mount uses its port")


def layout_stem(cmdline: Sequence[str], state_dir_real: str) -> Optional[str]:
    """The mount directory's name if cmdline is exactly `stunnel <state_dir>/<dir>/stunnel.conf`
    with <dir> named as efsplug names them; None otherwise. Names only (pure); the caller
    checks symlinks and the file."""
    if len(cmdline) != 2 or not is_stunnel(cmdline):
        return None
    config = cmdline[1]
    if not config.startswith("/") or os.path.normpath(config) != config:
        return None
    directory, name = os.path.split(config)
    parent, stem = os.path.split(directory)
    if name != CONFIG_NAME or not MOUNT_DIR.fullmatch(stem):
        return None
    if os.path.realpath(parent) != state_dir_real:  # /var/run/efs and /run/efs are one
        return None
    return stem


def marked_port(config: str) -> Tuple[bool, Optional[int]]:
    """(the file is a config efsplug wrote, the port it accepts on).

    Opened without following a symlink and without blocking (a FIFO is not a config),
    and read only up to a bound: the file is not trusted until its marker is seen.
    """
    try:
        fd = os.open(config, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False, None
        text = os.read(fd, _MAX_CONFIG).decode("utf-8", "replace")
    except OSError:
        return False, None
    finally:
        os.close(fd)
    if text.split("\n", 1)[0] != MARKER:
        return False, None
    found = _ACCEPT.search(text)
    return True, int(found.group(1)) if found else None


def candidates(state_dir: Path, known: Iterable[TunnelIdentity],
               foreign: Optional[Callable[[int, str], None]] = None) -> List[Candidate]:
    """efsplug's own live tunnels (proven as above) whose identity no loaded record holds,
    each aged by the boot clock (a wall-clock step would age a tunnel just started).

    foreign(pid, config) is told of each stunnel under state_dir that is not provably
    efsplug's: it is left alone, whatever it is.
    """
    state_dir_real = os.path.realpath(state_dir)
    known_set = {(i.pid, i.cmdline) for i in known}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = tuple(p.info.get("cmdline") or ())
        if (p.info["pid"], cmdline) in known_set or len(cmdline) < 2 or not is_stunnel(cmdline):
            continue
        stem = layout_stem(cmdline, state_dir_real)
        config = cmdline[1]
        mine, port = (False, None)
        if stem is not None and not os.path.islink(os.path.dirname(config)):
            mine, port = marked_port(config)
        if not mine:
            if tunnelhost.is_host_cmdline(cmdline, state_dir_real):
                continue  # a shared process: its sections are judged one by one (Sweeper)
            if foreign is not None and any(_under(a, state_dir, state_dir_real) for a in cmdline[1:]):
                foreign(p.info["pid"], " ".join(cmdline[1:])[:200])
            continue
        try:
            identity = TunnelIdentity.of(p.info["pid"])
        except psutil.Error:
            continue
        if identity.cmdline != cmdline:
            continue  # it exec'd something else meanwhile
        assert stem is not None
        found.append(Candidate(identity, stem, port, procinfo.seconds_running(identity.start_ticks)))
    return found


def _under(arg: str, state_dir: Path, state_dir_real: str) -> bool:
    """arg names something in the state directory, as written or once resolved."""
    return os.path.normpath(arg).startswith(f"{state_dir}/") or os.path.realpath(arg).startswith(f"{state_dir_real}/")


class Sweeper:
    """Finds orphans and stops the proven ones; what it leaves alone is logged once per process."""

    def __init__(self, state_dir: Path, *, min_age: float, interval: float,
                 read_mounts: Callable[[], List[KernelMount]]) -> None:
        self.state_dir, self.min_age, self.interval = Path(state_dir), min_age, interval
        self._read_mounts = read_mounts
        self._told: Dict[int, str] = {}  # pid -> what was logged about it (bounded by live pids)

    def sweep(self, known: Iterable[TunnelIdentity], now: float) -> float:
        """One sweep; returns when the next one is due."""
        next_due = now + self.interval
        seen: Dict[int, str] = {}

        def tell(pid: int, text: str, level: int = logging.INFO) -> None:
            seen[pid] = text
            if self._told.get(pid) != text:
                log.log(level, "%s", text)

        def foreign(pid: int, config: str) -> None:
            tell(pid, f"leaving tunnel pid {pid} ({config}) alone: not started by efsplug")

        ports_used: Optional[Set[int]] = None
        for c in candidates(self.state_dir, known, foreign):
            if ports_used is None:
                ports_used = set(ports_in_use(self._read_mounts()))  # fresh, once per sweep
            # Looked for last, right before deciding: a record saved a moment ago counts.
            verdict = judge(c, claimed=state.claimed(self.state_dir, c.stem), ports_used=ports_used,
                            min_age=self.min_age)
            if verdict.recheck_in is not None:
                next_due = min(next_due, now + verdict.recheck_in + 0.05)
                seen[c.identity.pid] = self._told.get(c.identity.pid, "")
            elif not verdict.stop:
                tell(c.identity.pid, f"keeping tunnel pid {c.identity.pid} ({c.stem}) although no loaded record "
                     f"knows it: {verdict.reason}")
            else:
                self._stop(c, verdict)
        next_due = min(next_due, self._sweep_sections(now))
        self._told = seen
        return next_due

    def _sweep_sections(self, now: float) -> float:
        """Sections of shared stunnel processes (efsplug.tunnelhost) that no record names,
        judged by the same rules as a tunnel process; returns when to look again."""
        next_due = now + self.interval
        found = [(host, tunnelhost.sections(host, now)) for host in tunnelhost.hosts(self.state_dir)]
        for host, listed in found:
            idle = tunnelhost.running(host) if not listed else None
            if idle is not None:
                try:
                    tunnelhost.remove(host, None)  # serving nothing: stopped, as its last remove would have
                except (TunnelError, OSError) as exc:
                    log.error("cannot stop idle shared tunnel process pid %d: %s", idle.pid, exc)
        if not any(listed for _, listed in found):
            return next_due
        records = state.load_all(self.state_dir)[0]
        named = tunnel_dirs(records)
        ports_used = set(ports_in_use(self._read_mounts()))
        for host, listed in found:
            identity = tunnelhost.running(host)
            if identity is None:
                continue
            for section in listed:
                c = Candidate(identity, section.stem, section.port, section.age)
                verdict = judge(c, claimed=section.stem in named or state.claimed(self.state_dir, section.stem),
                                ports_used=ports_used, min_age=self.min_age)
                if verdict.recheck_in is not None:
                    next_due = min(next_due, now + verdict.recheck_in + 0.05)
                elif verdict.stop:
                    try:
                        tunnelhost.remove(host, section.port)
                    except (TunnelError, OSError) as exc:
                        log.error("cannot remove orphan tunnel section %s of pid %d: %s", section.stem, identity.pid, exc)
                        continue
                    log.warning("removed orphan tunnel section %s (port %d) of pid %d: %s", section.stem,
                                section.port, identity.pid, verdict.reason)
        return next_due

    def _stop(self, c: Candidate, verdict: Verdict) -> None:
        tunnel = Tunnel.from_identity(c.identity)  # None if it exited or its pid was reused
        if tunnel is None:
            return
        try:
            tunnel.stop()
        except TunnelError as exc:
            log.error("cannot stop orphan tunnel pid %d (%s): %s", c.identity.pid, c.stem, exc)
            return
        log.warning("stopped orphan tunnel pid %d (%s): %s", c.identity.pid, c.identity.cmdline[-1], verdict.reason)


# --- one mount point's unrecorded directories ----------------------------------------------
# A mount cut between making its per-mount directory and saving its record (its process
# killed) leaves the directory -- certificate, stunnel.conf -- and maybe a running tunnel
# that no record names. The sweep above stops such a tunnel after ORPHAN_MIN_AGE but
# leaves the directory; the agent, which knows no mount of its volume is in progress,
# releases both at once.

def mount_dirs_of(state_dir: Path, mountpoint: str) -> List[str]:
    """Names of the per-mount directories in state_dir made for mountpoint (any fs id, port)."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return []
    found = []
    for name in names:
        parts = _STEM_PARTS.fullmatch(name)
        if parts is None:
            continue
        try:
            expected = state.file_name(state.MountRecord(fs_id=parts[1], mountpoint=mountpoint, port=int(parts[2])))
        except state.StateError:
            continue
        path = Path(state_dir) / name
        if expected == name + state.SUFFIX and path.is_dir() and not path.is_symlink():
            found.append(name)
    return sorted(found)


def tunnel_dirs(records: Iterable[state.MountRecord]) -> Set[str]:
    """The mount directories records' tunnels live in. A directory whose tunnel other mounts
    joined outlives its own mount's record (efsplug.sharing), so it is still owned."""
    return {os.path.basename(os.path.dirname(r.config_file)) for r in records if r.config_file}


def release_unrecorded(state_dir: Path, mountpoint: str, mounts: List[KernelMount]) -> List[str]:
    """Remove mountpoint's per-mount directories that no record names, after stopping
    efsplug's tunnel running from one; one whose port a kernel mount uses is left alone.

    Only for a caller that knows no mount of mountpoint is in progress: a mount in progress
    looks exactly like this until it saves its record. Returns the directories removed.
    """
    state_dir = Path(state_dir)
    used = set(ports_in_use(mounts))
    joined = tunnel_dirs(state.load_all(state_dir)[0])
    stems = [stem for stem in mount_dirs_of(state_dir, mountpoint)
             if not state.claimed(state_dir, stem) and stem not in joined and int(stem.rsplit(".", 1)[1]) not in used]
    if not stems:
        return []
    for c in candidates(state_dir, ()):
        if c.stem in stems:
            tunnel = Tunnel.from_identity(c.identity)
            if tunnel is not None:
                tunnel.stop()  # TunnelError: its directory stays, and the caller hears why
    for stem in stems:
        shutil.rmtree(state_dir / stem, ignore_errors=True)
    return stems
