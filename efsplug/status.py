"""`efsplug status`: every efs mount, its tunnel, its credentials and what the supervisor thinks.

Read-only: records from the state directory, the kernel's mount table, the tunnel
processes and the supervisor's per-mount status files; and, once the agent has made access
points, EFS's list of them (DescribeAccessPoints, bounded) for those whose volume is gone.
Credential sources are named, never their secrets. Then the cleanup wait in force and where
it came from: as the running supervisor published it, else computed here (from this
process's environment).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from efsplug import sharing, state
from efsplug.agent.store import DEFAULT_STATE_PATH
from efsplug.config import Config, load_config
from efsplug.ecsconfig import ecs_config_path, load_ecs_config
from efsplug.credentials import shown_source
from efsplug.errors import EfsplugError
from efsplug.mounttable import KernelMount, ports_in_use, read_mounts
from efsplug.state import MountRecord
from efsplug.supervisor import cleanup
from efsplug.supervisor.lock import holder_about, supervised
from efsplug.supervisor.statusfile import read_status
from efsplug.tunnel import Tunnel, listening_on
from efsplug.unmount import mount_dir


@dataclass(frozen=True)
class MountView:
    mountpoint: str
    fs_id: str
    path: str
    state: str
    reason: str
    mounted: bool
    port: Optional[int]
    tunnel_pid: Optional[int]
    tunnel_alive: bool
    tunnel_listening: bool
    access_point: Optional[str]
    credential_source: Optional[str]
    credential_expiry: Optional[str]
    cert_expiry: Optional[str]
    netns: Optional[str]
    shares_tunnel_with: Tuple[str, ...] = ()  # the other mounts through the same tunnel (port)
    # With tunnel_process = shared: the mounts whose tunnels are other sections of the same stunnel process.
    shares_process_with: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Surroundings:
    """What every record's view is read against, indexed once: status stays linear in the
    number of mounts (the supervisor's host may have a thousand)."""

    mounted: FrozenSet[str]  # normalised NFS mount points
    port_users: Dict[int, List[str]]
    by_tunnel: Dict[Tuple[int, str], List[MountRecord]]  # (port, tunnel config) -> its mounts
    by_process: Dict[str, List[MountRecord]]  # shared stunnel process config -> its mounts

    @classmethod
    def of(cls, records: Iterable[MountRecord], mounts: Iterable[KernelMount]) -> "Surroundings":
        mounts = list(mounts)
        by_tunnel: Dict[Tuple[int, str], List[MountRecord]] = {}
        by_process: Dict[str, List[MountRecord]] = {}
        for r in records:
            tunnel = sharing.tunnel_key(r)
            if tunnel is not None:
                by_tunnel.setdefault(tunnel, []).append(r)
            if r.host_config is not None:
                by_process.setdefault(r.host_config, []).append(r)
        return cls(frozenset(os.path.normpath(m.mountpoint) for m in mounts if m.is_nfs), ports_in_use(mounts),
                   by_tunnel, by_process)

    def shares_tunnel_with(self, record: MountRecord) -> Tuple[str, ...]:
        together = self.by_tunnel.get(sharing.tunnel_key(record), [])
        return tuple(sorted(r.mountpoint for r in sharing.siblings(record, together)))

    def shares_process_with(self, record: MountRecord) -> Tuple[str, ...]:
        if record.host_config is None:
            return ()
        return tuple(sorted(r.mountpoint for r in self.by_process[record.host_config]
                            if not sharing.same_tunnel(r, record)))


def view(record: MountRecord, around: Surroundings, state_dir: Path, supervisor_running: bool) -> MountView:
    mounted = os.path.normpath(record.mountpoint) in around.mounted
    users = around.port_users.get(record.port, []) if record.port else []
    tunnel = Tunnel.from_identity(record.tunnel) if record.tunnel else None
    listening = bool(tunnel and record.port and listening_on(tunnel.pid, record.port))
    reported = read_status(mount_dir(record, state_dir)) if supervisor_running else None
    if not mounted and not users:
        current, reason = "unmounted-pending-reap", "not in the mount table"
    elif record.tls and tunnel is None:
        current, reason = ("tunnel-restarting" if supervisor_running else "tunnel-down"), "tunnel process is gone"
    elif reported is not None:
        current, reason = reported.state, reported.reason
    else:
        current, reason = "ok", ""
    if not supervisor_running:
        reason = (reason + "; " if reason else "") + "no supervisor is running"

    def iso(when) -> Optional[str]:
        return when.isoformat() if when else None

    return MountView(
        mountpoint=record.mountpoint, fs_id=record.fs_id, path=record.path, state=current, reason=reason,
        mounted=mounted, port=record.port, tunnel_pid=record.tunnel.pid if record.tunnel else None,
        tunnel_alive=tunnel is not None, tunnel_listening=listening, access_point=record.access_point,
        credential_source=shown_source(record.credential_source), credential_expiry=iso(record.credential_expiry),
        cert_expiry=iso(record.cert_not_after), netns=record.netns,
        shares_tunnel_with=around.shares_tunnel_with(record), shares_process_with=around.shares_process_with(record),
    )


def collect(state_dir: Path) -> Tuple[List[MountView], List[str]]:
    """Every usable record's view, and one line per record that is not (bad or quarantined)."""
    records, problems = state.load_all(state_dir)
    around = Surroundings.of(records, read_mounts())
    running = supervised(state_dir)
    views = [view(r, around, state_dir, running) for r in sorted(records, key=lambda r: r.mountpoint)]
    return views, bad_record_lines(problems, state.quarantined_files(state_dir))


def bad_record_lines(problems: List[state.StateProblem], quarantined: List[Path]) -> List[str]:
    """One printable line per unusable record: its mount is not shown (nor supervised)."""
    lines = [f"unusable record: {p.reason}" for p in problems]
    lines += [f"quarantined record: {q} (unusable; its mount is not supervised)" for q in quarantined]
    # A file name is the only part not escaped yet: no control character may reach the terminal.
    return ["".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in line) for line in lines]


def cleanup_lines(published: Optional[str], computed: Callable[[], cleanup.CleanupWait], running: bool) -> List[str]:
    """The cleanup wait line, then one indented line per setting that was not used and why.

    published is what the running supervisor wrote in its lock file; computed works out
    what a supervisor started now would use (jitter not drawn).
    """
    wait = cleanup.CleanupWait.from_json(published) if running and published else None
    if wait is not None:
        head = "cleanup wait"
    else:
        wait = computed()
        head = "cleanup wait (computed here: " + (
            "the running supervisor does not publish it)" if running else "no supervisor is running)")
    return [f"{head}: {wait.describe()}"] + [f"    {note}" for note in wait.notes]


def access_point_lines(agent_state: Path, config: Config) -> List[str]:
    """Access points made for volumes this host no longer has (EFS is asked only if the agent
    ever made one)."""
    if not os.path.lexists(agent_state):
        return []
    from efsplug.agent.apreport import unowned_access_points

    return unowned_access_points(agent_state, config)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document (a list of mounts)")
    parser.add_argument("--agent-state", type=Path, default=DEFAULT_STATE_PATH, metavar="PATH",
                        help=f"the agent's state file, for access points made for volumes (default {DEFAULT_STATE_PATH})")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config().config
    except EfsplugError as exc:
        print(f"efsplug status: {exc}", file=sys.stderr)
        return exc.exit_code
    state_dir = Path(config.efsplug.state_dir)
    views, bad = collect(state_dir)
    bad += access_point_lines(args.agent_state, config)
    if args.json:
        print(json.dumps([asdict(v) for v in views], indent=2))
        for line in bad:  # the document stays a list of mounts
            print(f"efsplug status: {line}", file=sys.stderr)
        return 0
    if not views:
        print("no efs mounts")
    for v in views:
        pid = f"pid {v.tunnel_pid}" if v.tunnel_pid else "no pid"
        tunnel = f"port {v.port}, {pid}, {'alive' if v.tunnel_alive else 'dead'}" if v.port else "no tunnel"
        if v.tunnel_alive and not v.tunnel_listening:
            tunnel += " but not listening"
        print(f"{v.mountpoint}  {v.fs_id}:{v.path}  {v.state}" + (f" ({v.reason})" if v.reason else ""))
        print(f"    tunnel: {tunnel}" + (f", netns {v.netns}" if v.netns else ""))
        if v.shares_tunnel_with:
            print(f"    tunnel shared with: {', '.join(v.shares_tunnel_with)}")
        if v.shares_process_with:
            print(f"    stunnel process shared with: {', '.join(v.shares_process_with)}")
        if v.access_point:
            print(f"    access point: {v.access_point}")
        if v.credential_source:
            print(f"    credentials: {v.credential_source}, expire {v.credential_expiry or 'never'}")
        if v.cert_expiry:
            print(f"    certificate expires {v.cert_expiry}")
    for line in bad:
        print(line)

    def computed() -> cleanup.CleanupWait:
        ecs = load_ecs_config(ecs_config_path(os.environ), cleanup.NAMES)
        return cleanup.cleanup_wait(config, os.environ, ecs, rand=None)

    for line in cleanup_lines(holder_about(state_dir), computed, supervised(state_dir)):
        print(line)
    return 0
