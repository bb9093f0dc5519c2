"""NFS-Ganesha in user space: the NFSv4.1 server behind each emulated export.

One instance per export directory (the file system root, and one per access point root),
each on its own loopback port; the host kernel has no NFS server of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from efsbed import procs

GANESHA = "/usr/bin/ganesha.nfsd"


@dataclass(frozen=True)
class AllSquash:
    """Every caller, root included, acts as uid:gid: how an access point's PosixUser is enforced."""

    uid: int
    gid: int


def _squash_lines(squash: Optional[AllSquash]) -> str:
    # The file system root and the bed's seeded access points keep No_Root_Squash (IAM-less
    # root mounts see a plain EFS); only runtime access points map callers to their user.
    if squash is None:
        return "Squash = No_Root_Squash;"
    return f"Squash = All_Squash;\n    Anonymous_Uid = {squash.uid};\n    Anonymous_Gid = {squash.gid};"


def ganesha_config(*, port: int, export_dir: Path, recovery_dir: Path, squash: Optional[AllSquash] = None) -> str:
    # Graceless: a fresh server must serve at once instead of waiting out a grace period.
    return f"""\
NFS_CORE_PARAM {{
    Protocols = 4;
    NFS_Port = {port};
    Bind_addr = 127.0.0.1;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSv4 {{
    Graceless = true;
    Minor_Versions = 0, 1, 2;
    RecoveryBackend = fs;
    RecoveryRoot = {recovery_dir};
}}
EXPORT {{
    Export_Id = 1;
    Path = {export_dir};
    Pseudo = /;
    Access_Type = RW;
    {_squash_lines(squash)}
    SecType = sys;
    Protocols = 4;
    Transports = TCP;
    FSAL {{
        Name = VFS;
    }}
}}
"""


INITIALIZED = b"NFS SERVER INITIALIZED"  # ganesha's log line once its worker threads serve


def log_size(log_path: Path) -> int:
    """Where this start's log lines will begin: a restart appends to the same log."""
    try:
        return log_path.stat().st_size
    except FileNotFoundError:
        return 0


def wait_serving(port: int, log_path: Path, process: procs.BedProcess, timeout: float, since: int = 0) -> None:
    """Wait until ganesha accepts on port and says it serves. Listening comes first: its
    sockets are bound before its worker threads start, and a connection routed to it in
    between was seen reset (the doctor's single NFS NULL call, under load)."""
    deadline = time.monotonic() + timeout
    procs.wait_for_port(port, timeout=timeout, process=process)

    def logged() -> bool:
        try:
            with open(log_path, "rb") as f:
                f.seek(since)
                return INITIALIZED in f.read()
        except FileNotFoundError:
            return False

    procs.wait_until(logged, max(0.0, deadline - time.monotonic()),
                     f"ganesha on port {port} to log {INITIALIZED.decode()!r}", process=process, max_delay=0.1)


class Ganesha(procs.Service):
    name = 'ganesha'

    def __init__(self, workdir: Path, export_dir: Path, *, tag: str) -> None:
        self.workdir = workdir
        self.export_dir = export_dir
        self.tag = tag
        self.config_path = workdir / "ganesha.conf"
        self.log_path = workdir / "ganesha.log"
        self.pid_path = workdir / "ganesha.pid"

    def __repr__(self) -> str:
        return f"Ganesha({str(self.export_dir)!r}, port={self._port})"

    def start(self) -> "Ganesha":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.export_dir.mkdir(parents=True, exist_ok=True)
        recovery = self.workdir / "recovery"
        recovery.mkdir(exist_ok=True)
        since = log_size(self.log_path)
        self._port = procs.free_port()
        self.config_path.write_text(
            ganesha_config(port=self._port, export_dir=self.export_dir.resolve(), recovery_dir=recovery)
        )
        self._process = procs.start(
            f"ganesha-{self.export_dir.name}",
            [GANESHA, "-F", "-f", str(self.config_path), "-L", str(self.log_path), "-p", str(self.pid_path)],
            tag=self.tag, log=self.workdir / "ganesha.stdout",
        )
        try:
            wait_serving(self._port, self.log_path, self._process, timeout=30.0, since=since)
        except BaseException as e:
            self.stop()
            raise RuntimeError(f"ganesha did not start: {e}\n{self.log_tail()}") from e
        return self

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

