"""Driving the agent from tests and benchmarks: a dockerd-shaped client, a scripted
mounter for in-process protocol tests, and the agent served in process or as a process.

The real mount is proven in the kernel guest (tests/bed/test_agent_docker.py); on the host
the kernel has no NFS, so protocol tests that need Mount to succeed inject FakeMounter.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from efsbed import procs
from efsplug.agent.plugin import Plugin
from efsplug.agent.server import AgentServer, RequestLog, bind_socket
from efsplug.agent.store import Store
from efsplug.errors import MountFailure
from efsplug.options import MountRequest

ACCEPT = "application/vnd.docker.plugins.v1.2+json"
EFSPLUG = Path(sys.executable).with_name("efsplug")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("plugin", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class Reply:
    status: int
    body: Dict[str, Any]
    content_type: str


class PluginClient:
    """Posts what dockerd posts: no Content-Type, a trailing newline, one kept-alive connection."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.conn = _UnixConnection(str(socket_path), timeout)

    def post_raw(self, endpoint: str, body: bytes) -> Reply:
        self.conn.putrequest("POST", endpoint, skip_accept_encoding=True)
        self.conn.putheader("Accept", ACCEPT)
        self.conn.putheader("Content-Length", str(len(body)))
        self.conn.endheaders(body)
        resp = self.conn.getresponse()
        data = resp.read()
        return Reply(resp.status, json.loads(data), resp.getheader("Content-Type", ""))

    def call(self, endpoint: str, payload: Optional[Dict[str, Any]] = None) -> Reply:
        body = b"" if payload is None else (json.dumps(payload) + "\n").encode()
        return self.post_raw(f"/{endpoint}", body)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "PluginClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class FakeMounter:
    """Mounts nothing; records calls. `gate` holds mounts until set (to test what waits);
    `latency` models a real mount's duration for the benchmark."""

    latency: float = 0.0
    gate: Optional[threading.Event] = None
    fail_with: Optional[str] = None
    mounted: Set[str] = field(default_factory=set)
    calls: List[Tuple[str, str]] = field(default_factory=list)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def mount(self, request: MountRequest) -> None:
        assert request.mountpoint and os.path.isdir(request.mountpoint), "the plugin creates the mountpoint first"
        with self._lock:
            self.calls.append(("mount", request.mountpoint))
        self.entered.release()
        if self.gate is not None and not self.gate.wait(60):
            raise MountFailure("test gate never opened")
        if self.latency:
            time.sleep(self.latency)  # a modelled mount duration (benchmark), not a wait for an event
        if self.fail_with:
            raise MountFailure(self.fail_with)
        with self._lock:
            self.mounted.add(request.mountpoint)

    def unmount(self, mountpoint: str) -> None:
        with self._lock:
            self.calls.append(("unmount", mountpoint))
            self.mounted.discard(mountpoint)

    def is_mounted(self, mountpoint: str) -> bool:
        with self._lock:
            return mountpoint in self.mounted

    def count(self, what: str) -> int:
        with self._lock:
            return sum(1 for kind, _ in self.calls if kind == what)


@contextlib.contextmanager
def serve_in_process(plugin: Plugin, socket_path: Path, log: Optional[RequestLog] = None) -> Iterator[AgentServer]:
    """The agent's real server on a real socket, with plugin (and its injected mounter)."""
    server = AgentServer(bind_socket(socket_path), plugin, log or RequestLog(open(os.devnull, "w")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.remove_socket()
        server.server_close()
        thread.join(10)


def plugin_with(tmp: Path, mounter: FakeMounter) -> Plugin:
    return Plugin(Store(tmp / "state" / "volumes.json"), tmp / "volumes", mounter=mounter)


@dataclass
class AgentProcess:
    proc: procs.BedProcess
    socket_path: Path
    state_path: Path

    def log(self) -> str:
        return self.proc.log.read_text() if self.proc.log and self.proc.log.exists() else ""


def start_agent(workdir: Path, *, tag: str, name: str = "agent", env: Optional[Mapping[str, str]] = None) -> AgentProcess:
    """`efsplug agent` as a process with its files under workdir (environment env, default
    this one's); returns once it serves."""
    socket_path, state_path = workdir / "plugins" / "efs-test.sock", workdir / "data" / "volumes.json"
    # The in-process supervisor looks after this agent's own state dir, never the host's.
    (workdir / "efs-utils.conf").write_text(f"[efsplug]\nstate_dir = {workdir / 'efs-state'}\n")
    argv = [str(EFSPLUG), "agent", "--socket", str(socket_path), "--state", str(state_path),
            "--volumes-root", str(workdir / "volumes"), "--config", str(workdir / "efs-utils.conf")]
    proc = procs.start(name, argv, tag=tag, log=workdir / f"{name}.log", env=env)
    agent = AgentProcess(proc, socket_path, state_path)
    procs.wait_until(lambda: "serving" in agent.log(), 20, "the agent to serve", process=proc)
    return agent


