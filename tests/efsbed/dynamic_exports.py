"""Access points created at run time, served by the endpoint the way EFS serves them.

The endpoint's static routes cover what the bed set up before it started. A client whose
certificate names any other access point is admitted only if the bed's moto knows it
(asked again on every connection, so an access point deleted in moto is refused from then
on), it belongs to this file system and it is available. Its root directory is created
from CreationInfo when missing, and one ganesha per access point serves that directory
with every caller squashed to the access point's PosixUser.

Those ganesha processes are the endpoint's children in the endpoint's own process group
(procs.start gives the endpoint a new session; its stop signals the whole group), and
the endpoint also stops them itself on SIGTERM: none may outlive the endpoint.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional

from efsbed import procs
from efsbed.ganesha import GANESHA, AllSquash, ganesha_config, log_size, wait_serving

ACCESS_POINT_NOT_FOUND = "access point not found"
OTHER_FILE_SYSTEM = "access point belongs to another file system"
ROOT_MISSING = "access point root directory does not exist"

LOOKUP_CONNECT_TIMEOUT = 2.0  # moto is on loopback: a slow answer means it is gone
LOOKUP_READ_TIMEOUT = 5.0
GANESHA_START_TIMEOUT = 30.0
GANESHA_STOP_TIMEOUT = 10.0


class AccessPointRefused(Exception):
    """The connection must be refused; str() is the reason the event log gives."""


@dataclass(frozen=True)
class CreationInfo:
    uid: int
    gid: int
    mode: int


@dataclass(frozen=True)
class RuntimeAccessPoint:
    id: str
    fs_id: str
    state: str
    root: str  # RootDirectory.Path, absolute within the file system
    posix_user: Optional[AllSquash]  # None: no PosixUser, callers keep their own ids
    creation: Optional[CreationInfo]

    @classmethod
    def from_api(cls, entry: Dict[str, Any]) -> "RuntimeAccessPoint":
        user = entry.get("PosixUser") or {}
        root = entry.get("RootDirectory") or {}
        info = root.get("CreationInfo")
        return cls(
            id=entry["AccessPointId"],
            fs_id=entry["FileSystemId"],
            state=entry.get("LifeCycleState", ""),
            root=root.get("Path") or "/",
            posix_user=AllSquash(int(user["Uid"]), int(user["Gid"])) if "Uid" in user else None,
            creation=CreationInfo(int(info["OwnerUid"]), int(info["OwnerGid"]), int(info["Permissions"], 8))
            if info else None,
        )


class AccessPointLookup:
    """DescribeAccessPoints against the bed's moto, bounded: a connection must not hang on it."""

    def __init__(self, moto_url: str, region: str) -> None:
        # botocore is only needed when the feature is on, so it is imported here.
        from botocore.config import Config

        from efsbed.aws import client

        config = Config(connect_timeout=LOOKUP_CONNECT_TIMEOUT, read_timeout=LOOKUP_READ_TIMEOUT,
                        retries={"total_max_attempts": 1, "mode": "standard"})
        self._efs = client("efs", moto_url, region, config=config)

    def describe(self, ap_id: str) -> RuntimeAccessPoint:
        import botocore.exceptions

        try:
            answer = self._efs.describe_access_points(AccessPointId=ap_id)
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "AccessPointNotFound":
                raise AccessPointRefused(ACCESS_POINT_NOT_FOUND) from None
            raise AccessPointRefused(f"access point lookup failed: {e}") from None
        except botocore.exceptions.BotoCoreError as e:
            raise AccessPointRefused(f"access point lookup failed: {e}") from None
        points = answer.get("AccessPoints") or []
        if not points:
            raise AccessPointRefused(ACCESS_POINT_NOT_FOUND)
        return RuntimeAccessPoint.from_api(points[0])


@dataclass
class ChildGanesha:
    access_point: str
    port: int
    export_dir: Path
    process: procs.BedProcess  # for wait_serving's liveness check and log tail

    def alive(self) -> bool:
        return self.process.alive()

    def terminate(self) -> None:
        # Not BedProcess.stop: that signals the process group, and this child's group is
        # the endpoint's own.
        if self.alive():
            self.process.popen.terminate()

    def reap(self, timeout: float = GANESHA_STOP_TIMEOUT) -> None:
        try:
            self.process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.popen.kill()
            self.process.popen.wait(timeout=5.0)


class DynamicExports:
    """Access point id -> the port of its own ganesha, started on the first admitted connection."""

    def __init__(self, *, fs_id: str, lookup: AccessPointLookup, root_export_dir: Path, workdir: Path,
                 report: Callable[..., None]) -> None:
        self._fs_id = fs_id
        self._lookup = lookup
        self._root_export_dir = root_export_dir
        self._workdir = workdir
        self._report = report
        # _registry guards the dicts and _closing, and is held around every Popen so that
        # stop_all cannot miss a child being born. It is held only briefly: stop_all runs
        # in the SIGTERM handler and must not wait out a ganesha start.
        self._registry = threading.Lock()
        self._start_locks: Dict[str, threading.Lock] = {}  # one start per access point
        self._exports: Dict[str, ChildGanesha] = {}
        self._closing = False

    def route(self, ap_id: str) -> int:
        """The backend port for ap_id, starting its ganesha if needed; or AccessPointRefused."""
        ap = self._lookup.describe(ap_id)  # every connection: deletion takes effect at once
        if ap.fs_id != self._fs_id:
            raise AccessPointRefused(OTHER_FILE_SYSTEM)
        if ap.state != "available":
            raise AccessPointRefused(f"access point is {ap.state or 'in an unknown state'}")
        with self._registry:
            start_lock = self._start_locks.setdefault(ap_id, threading.Lock())
        with start_lock:  # a second first connection waits here and reuses the first's ganesha
            running = self._exports.get(ap_id)
            if running is not None and running.alive():
                return running.port
            return self._start(ap).port

    def _start(self, ap: RuntimeAccessPoint) -> ChildGanesha:
        export_dir = self._root_dir(ap)
        workdir = self._workdir / ap.id
        recovery = workdir / "recovery"
        recovery.mkdir(parents=True, exist_ok=True)
        port = procs.free_port()
        config_path = workdir / "ganesha.conf"
        config_path.write_text(ganesha_config(port=port, export_dir=export_dir, recovery_dir=recovery,
                                              squash=ap.posix_user))
        argv = [GANESHA, "-F", "-f", str(config_path), "-L", str(workdir / "ganesha.log"),
                "-p", str(workdir / "ganesha.pid")]
        stdout = workdir / "ganesha.stdout"
        since = log_size(workdir / "ganesha.log")
        with self._registry:
            if self._closing:
                raise AccessPointRefused("endpoint is stopping")
            with open(stdout, "ab") as out:
                # No new session: the child stays in the endpoint's process group, so even
                # an endpoint killed outright takes it along when its group is stopped.
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            child = ChildGanesha(ap.id, port, export_dir, procs.BedProcess(f"ganesha-{ap.id}", popen, stdout))
            self._exports[ap.id] = child
        try:
            wait_serving(port, workdir / "ganesha.log", child.process, timeout=GANESHA_START_TIMEOUT, since=since)
        except (RuntimeError, TimeoutError) as e:
            child.terminate()
            child.reap()
            raise AccessPointRefused(f"access point export did not start: {e}") from None
        uid = ap.posix_user.uid if ap.posix_user else None
        gid = ap.posix_user.gid if ap.posix_user else None
        self._report(event="export_started", access_point=ap.id, root=ap.root, uid=uid, gid=gid,
                     backend_port=port, export_dir=str(export_dir))
        return child

    def _root_dir(self, ap: RuntimeAccessPoint) -> Path:
        """The access point's root on the host, created from CreationInfo if missing (as EFS does)."""
        parts = PurePosixPath(ap.root).parts[1:]
        if ".." in parts:  # EFS rejects such paths at creation; never leave the file system
            raise AccessPointRefused("access point root directory is outside the file system")
        if not self._root_export_dir.is_dir():
            raise AccessPointRefused("file system root export directory is missing")
        target = self._root_export_dir.joinpath(*parts)
        missing: List[Path] = []
        here = target
        while not here.exists():  # stops at the root export at the latest: it exists
            missing.append(here)
            here = here.parent
        if missing and ap.creation is None:
            raise AccessPointRefused(ROOT_MISSING)
        for directory in reversed(missing):
            # Parents too get CreationInfo's owner and mode: they did not exist either.
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # made meanwhile, by a client of the root export: leave it as it is
            assert ap.creation is not None
            os.chown(directory, ap.creation.uid, ap.creation.gid)
            os.chmod(directory, ap.creation.mode)  # mkdir's mode is filtered by the umask
        if not target.is_dir():
            raise AccessPointRefused("access point root directory is not a directory")
        return target.resolve()

    def stop_all(self) -> None:
        """Stop every child ganesha (the endpoint's SIGTERM path); later starts are refused."""
        with self._registry:
            self._closing = True
            children = list(self._exports.values())
        for child in children:  # signal all first, then wait: they shut down in parallel
            child.terminate()
        for child in children:
            child.reap()
