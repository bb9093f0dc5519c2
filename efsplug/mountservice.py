"""The resident side of efsplug.handoff: prepare mounts for mount.efs processes.

Started by `efsplug agent` and `efsplug supervise`. Each connection gets a thread (at
most MAX_CLIENTS at once; past that a caller is told to do it itself), a bounded read,
and exactly what mount.efs would do in process: efsplug.mount.prepare_mount with the
caller's command line, environment and config file. What it made is kept only once the
answer has been written to the caller; if the caller is gone by then, it is undone.

Served only to root (the socket is 0660 root:root, and the peer's uid is checked) and
only to callers in this process's mount and network namespaces: a tunnel started here
must be reachable where the caller runs mount.nfs4, and the mount point must be the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from efsplug import handoff
from efsplug.errors import EfsplugError, shown

log = logging.getLogger("efsplug.mountservice")
MAX_CLIENTS = 16
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 5.0


class MountService:
    def __init__(self, path: Path) -> None:
        from efsplug.agent.server import bind_socket

        self.path = Path(path)
        self._listener = bind_socket(self.path)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stopping = threading.Event()
        self._own_ns = handoff.namespaces()
        self._thread = threading.Thread(target=self._accept_loop, name="efsplug-mountservice", daemon=True)

    @classmethod
    def start_at(cls, path: Path) -> Optional["MountService"]:
        """Serve path; None (logged) if it cannot be served: mount.efs then works alone."""
        try:
            service = cls(path)
        except (OSError, EfsplugError) as exc:
            log.warning("not serving mount.efs at %s (%s); mount.efs will do its own work", path, exc)
            return None
        service._thread.start()
        log.info("serving mount.efs at %s", path)
        return service

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with contextlib.suppress(OSError):
            if self.path.is_socket():
                self.path.unlink()
        self._thread.join(5.0)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                _answer(conn, {"v": handoff.VERSION, "handled": False, "why": "busy"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="efsplug-mountservice-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        except Exception:  # a bug must not take the service (or the agent) down
            log.exception("serving a mount.efs failed")
        finally:
            conn.close()
            self._slots.release()

    def _serve_one(self, conn: socket.socket) -> None:
        if _peer_uid(conn) != 0:
            _answer(conn, {"v": handoff.VERSION, "handled": False, "why": "not root"})
            return
        try:
            request = handoff.read_message(conn, time.monotonic() + READ_TIMEOUT)
        except (OSError, handoff.ProtocolError) as exc:
            log.warning("a mount.efs request could not be read: %s", exc)
            return
        why = self._refusal(request)
        if why is not None:
            _answer(conn, {"v": handoff.VERSION, "handled": False, "why": why})
        elif "release" in request:
            self._release(conn, request["release"], request["env"])
        else:
            self._prepare(conn, request)

    def _refusal(self, request: Dict[str, Any]) -> Optional[str]:
        if request.get("v") != handoff.VERSION:
            return "another protocol version"
        argv, env, record = request.get("argv"), request.get("env"), request.get("release")
        if "release" in request:
            if not (isinstance(record, str) and _is_record_name(record)):
                return "not a record's file name"
        elif not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            return "no command line"
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            return "no environment"
        if request.get("ns") != self._own_ns:
            return "another mount or network namespace"
        return None

    def _release(self, conn: socket.socket, name: str, env: Mapping[str, str]) -> None:
        """Undo what _prepare made for a mount mount.efs could not make (handoff.request_release):
        here, because the tunnel is this process's child and only its parent can reap it."""
        from efsplug import state
        from efsplug.config import load_config
        from efsplug.nfs import mounted_through
        from efsplug.unmount import release

        try:
            state_dir = Path(load_config(environ=env).config.efsplug.state_dir)
            record = state.load(state_dir / name)
            if record.port is not None and mounted_through(record.mountpoint, record.port):
                # Never for a mount the kernel has: its tunnel would go from under it.
                why = f"{shown(record.mountpoint)} is mounted through port {record.port}"
            elif release(record, state_dir=state_dir, failed_mount=True):
                log.info("released %s: mount.efs could not mount %s", name, shown(record.mountpoint))
                _answer(conn, {"v": handoff.VERSION, "handled": True, "released": True})
                return
            else:  # its port is held: the supervisor reaping it too, or a mount joining it
                why = f"port {record.port} is in use by another efsplug process"
        except (EfsplugError, state.StateError) as exc:  # UnmountError is an EfsplugError
            why = str(exc)
        log.warning("not releasing %s for mount.efs: %s", name, why)
        _answer(conn, {"v": handoff.VERSION, "handled": True, "released": False, "why": why})

    def _prepare(self, conn: socket.socket, request: Dict[str, Any]) -> None:
        from efsplug.config import load_config
        from efsplug.mount import Timings, prepare_mount
        from efsplug.options import parse_mount_args

        env: Mapping[str, str] = request["env"]
        timings = Timings()
        with contextlib.ExitStack() as undo:
            try:
                mount_request = parse_mount_args(request["argv"])
                if not os.path.isabs(str(mount_request.mountpoint)):
                    _answer(conn, {"v": handoff.VERSION, "handled": False, "why": "a relative mount point"})
                    return
                loaded = load_config(environ=env)
                if loaded.config.cloudwatch_log.enabled:
                    _answer(conn, {"v": handoff.VERSION, "handled": False, "why": "CloudWatch Logs is on"})
                    return
                prepared = prepare_mount(mount_request, loaded.config, environ=env, timings=timings,
                                         now=lambda: datetime.now(timezone.utc), undo=undo)
            except EfsplugError as exc:
                _answer(conn, {"v": handoff.VERSION, "handled": True, "ok": False, "error": str(exc),
                               "exit": exc.exit_code})
                return
            answer = {"v": handoff.VERSION, "handled": True, "ok": True, "warnings": loaded.warnings,
                      "timings": timings.line(), "pid": os.getpid()}
            if prepared is not None:
                answer.update(prepared=_prepared_fields(prepared))
            if _answer(conn, answer):
                undo.pop_all()  # mount.efs has it: its mount, or its undo, from here on
            else:
                log.warning("mount.efs (pid %s) left before its answer; undoing what was made for %s",
                            request.get("pid"), shown(str(mount_request.mountpoint)))


def _prepared_fields(prepared: Any) -> Dict[str, Any]:
    nfs = prepared.nfs
    record = prepared.record
    return {
        "record": None if record is None else _record_name(record),
        "port": None if record is None else record.port,
        "source": nfs.source, "mountpoint": nfs.mountpoint, "options": nfs.options, "netns": nfs.netns,
        "flags": list(nfs.flags), "access_point": nfs.access_point, "tunnel_log": nfs.tunnel_log,
        "tunnel_service": nfs.tunnel_service,
        "target": nfs.target, "identity": nfs.identity,
        "attempts": prepared.attempts, "attempt_timeout": prepared.attempt_timeout, "verbose": prepared.verbose,
    }


def _is_record_name(name: str) -> bool:
    """A record's file name in the state directory, and nothing that could lead out of it."""
    from efsplug import state

    return (name == os.path.basename(name) and name.endswith(state.SUFFIX) and not name.startswith(".")
            and "\0" not in name and len(name) <= 255)


def _record_name(record: Any) -> str:
    from efsplug import state

    return state.file_name(record)


def _answer(conn: socket.socket, message: Dict[str, Any]) -> bool:
    """True if the whole answer was written (the caller may have gone)."""
    try:
        conn.settimeout(WRITE_TIMEOUT)
        conn.sendall(handoff.encode(message))
        return True
    except (OSError, handoff.ProtocolError):
        return False


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]
