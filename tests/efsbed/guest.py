"""A real Linux kernel (user-mode Linux, see kernel.py) as the bed's NFS client, driven over a socket.

The host has no NFS client, so everything that must mount runs in a UML guest whose root
is the host's `/`, read-only (hostfs): the guest runs the host's own python3, venv,
stunnel and mount.nfs4. guest_init.py (PID 1) then lays the guest out like this:

* tmpfs: /run, /tmp, /mnt, /srv, /root, /var/tmp, /var/log, /dev/shm: the read-only root
  must become writable where daemons and tests write; nothing from the host is needed there.
* overlays (host's files below, tmpfs above): /etc (tests write /etc/hosts and
  /etc/amazon/efs/...), /usr/lib (the host has no /lib/modules: the UML package's module
  tree of the kernel in use is linked in so modprobe works), /usr/sbin (`sbin` entries appear as
  /sbin/<name>, so `mount -t efs` finds /sbin/mount.efs as on a real host), /var (so
  /var/lib/... can be created, e.g. by dockerd).
* devpts (ptmxmode=666), mqueue, cgroup2 (nsdelegate): what dockerd needs in the guest.
* hostfs, writable: the Guest's workdir at its own path (so the guest reads and writes
  the files a test puts there even under /tmp), and every `shares` entry.
* network: the kernel's one interface (eth0 or vec0) = 10.0.2.15/32 behind slirp; the
  host's loopback is 10.0.2.2, the only address routed; the default route is unreachable
  and IPv6 is off on the link. Each Forward's address sits on lo, where guest_forward.py
  relays guest_ip:guest_port to 10.0.2.2:<host port>. resolv.conf points at the guest's
  127.0.0.1 where nothing answers, so unknown names fail fast. The link only comes up after
  all that is in place, and any failed setup step powers the guest off (fail closed: no
  traffic reaches a real network).

guest_agent.py then connects back to a listener this class opened on the host's
127.0.0.1 and runs commands (JSON lines, multiplexed by request id, so run() may be
called from many threads at once).
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from efsbed import kernel as kernels
from efsbed import procs

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[1]  # holds the guest's agent and the venv; may sit under /tmp (tmpfs in the guest)
AGENT = HERE / "guest_agent.py"
DEFAULT_HANG_GRACE = 15.0
CONTROL_TIMEOUT = 15.0  # spawn/kill/poweroff answers, before the hang grace


class GuestError(RuntimeError):
    """The guest could not do what was asked (boot failure, lost channel, bad request)."""


class GuestHung(GuestError):
    """A command did not answer within its timeout plus the grace; the guest was powered off."""


class GuestCommandError(GuestError):
    def __init__(self, argv: Sequence[str], result: "GuestResult") -> None:
        super().__init__(
            f"guest command {list(argv)} failed: rc={result.rc} timed_out={result.timed_out}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
        self.result = result


@dataclass(frozen=True)
class Forward:
    """Guest TCP to guest_ip:guest_port is relayed to the host's 127.0.0.1:host_port."""

    guest_ip: str
    guest_port: int
    host_port: int


@dataclass(frozen=True)
class GuestResult:
    rc: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool


class _Channel:
    """The agent's socket: requests out under a lock, answers routed to waiters by id."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: Dict[int, Dict[str, Any]] = {}
        self._events: Dict[int, threading.Event] = {}
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="efsbed-guest-channel", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self._sock.makefile("rb"):
                msg = json.loads(line)
                with self._lock:
                    event = self._events.get(msg.get("id"))
                    if event is not None:
                        self._pending[msg["id"]] = msg
                        event.set()
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            with self._lock:
                for event in self._events.values():
                    event.set()  # waiters see no answer and a closed channel

    def request(self, msg: Dict[str, Any], wait: float) -> Optional[Dict[str, Any]]:
        """The answer, or None if none came within wait (raises GuestError if the channel closed)."""
        event = threading.Event()
        with self._lock:
            req_id = next(self._ids)
            self._events[req_id] = event
        try:
            data = (json.dumps(dict(msg, id=req_id)) + "\n").encode()
            if self.closed.is_set():
                raise GuestError("the guest agent's connection is closed")
            with self._send_lock:
                self._sock.sendall(data)
            event.wait(wait)
            with self._lock:
                answer = self._pending.pop(req_id, None)
            if answer is None and self.closed.is_set():
                raise GuestError("the guest agent's connection closed before it answered")
            return answer
        except OSError as exc:
            raise GuestError(f"cannot reach the guest agent: {exc}") from exc
        finally:
            with self._lock:
                self._events.pop(req_id, None)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(5.0)


class Guest:
    def __init__(
        self,
        workdir: Path,
        *,
        tag: str,
        forwards: Sequence[Forward] = (),
        hosts: Mapping[str, str] = {},
        shares: Mapping[str, Path] = {},
        sbin: Mapping[str, str] = {},
        mem_mb: int = 1024,
        hang_grace: float = DEFAULT_HANG_GRACE,
        systemd: bool = False,
        kernel: Optional[kernels.Kernel] = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.kernel = kernel or kernels.select()
        self.tag = tag
        self.forwards = tuple(forwards)
        self.hosts = dict(hosts)
        self.shares = {str(CHECKOUT): CHECKOUT, **{str(k): Path(v).resolve() for k, v in shares.items()}}
        self.sbin = dict(sbin)
        self.mem_mb = mem_mb
        self.systemd = systemd  # PID 1 becomes systemd after setup (units tested for real)
        self.hang_grace = hang_grace
        self.console_log = self.workdir / "guest-console.log"
        self.agent_pid: Optional[int] = None
        _validate(self)
        self._procs: Dict[str, procs.BedProcess] = {}
        self._sockdir: Optional[Path] = None
        self._listener: Optional[socket.socket] = None
        self._channel: Optional[_Channel] = None
        self._started = False
        self._dead_reason: Optional[str] = None
        self._state_lock = threading.Lock()
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "Guest":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        if self._started:
            raise GuestError("a Guest starts once")
        self._started = True
        try:
            self._boot(timeout)
        except BaseException:
            self.stop()
            raise

    def _boot(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are short (108 bytes): the switch and UML's own dir live in /tmp.
        self._sockdir = Path(tempfile.mkdtemp(prefix="efsbed-uml-", dir="/tmp"))
        switch_dir = self._sockdir / "vde"
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(4)
        nonce = secrets.token_hex(16)
        config = self.workdir / "guest-config.json"
        config.write_text(json.dumps(self._guest_config(self._listener.getsockname()[1], nonce)))
        deadline = time.monotonic() + timeout
        self._procs["vde_switch"] = procs.start(
            "vde_switch", ["vde_switch", "-s", str(switch_dir)], tag=self.tag,
            log=self.workdir / "vde_switch.log", keep_stdin_open=True,
        )
        _wait_for(lambda: (switch_dir / "ctl").exists(), self._procs["vde_switch"], deadline)
        # slirpvde dies of SIGPIPE when a host peer resets a connection it still writes to
        # (an endpoint refusing a client): with SIGPIPE ignored it gets EPIPE and carries on.
        self._procs["slirpvde"] = procs.start(
            "slirpvde", ["env", "--ignore-signal=PIPE", "slirpvde", "-s", str(switch_dir)], tag=self.tag,
            log=self.workdir / "slirpvde.log",
        )
        argv = [
            str(self.kernel.binary), *kernels.base_args(self.kernel, mem_mb=self.mem_mb, uml_dir=self._sockdir),
            self.kernel.net_arg(switch_dir), f"EFSBED_CONFIG={config}",
        ]
        env = dict(os.environ, TMPDIR="/dev/shm")
        self._procs["uml"] = procs.start("linux.uml", argv, tag=self.tag, log=self.console_log, env=env)
        self._channel = self._accept_agent(nonce, deadline)

    def _guest_config(self, port: int, nonce: str) -> Dict[str, Any]:
        return {
            "port": port,
            "nonce": nonce,
            "agent": str(AGENT),
            "modules": str(self.kernel.modules),
            "workdir": str(self.workdir),
            "forwards": [f.__dict__ for f in self.forwards],
            "hosts": self.hosts,
            "shares": {k: str(v) for k, v in self.shares.items()},
            "systemd": self.systemd,
            "sbin": self.sbin,
        }

    def _accept_agent(self, nonce: str, deadline: float) -> _Channel:
        assert self._listener is not None
        uml = self._procs["uml"]
        while True:
            remaining = deadline - time.monotonic()
            if not uml.alive():
                console = self.console_tail(400)
                raise GuestError(
                    f"the guest ({self.kernel.describe()}) powered off before its agent connected: "
                    f"{_why_down(console)}\n{self.console_tail()}"
                )
            if remaining <= 0:
                raise GuestError(f"the guest agent did not connect in time:\n{self.console_tail()}")
            # Wake up now and then to notice a guest that powered off (failed setup).
            ready, _, _ = select.select([self._listener], [], [], min(remaining, 0.25))
            if not ready:
                continue
            sock, _ = self._listener.accept()
            sock.settimeout(10.0)
            try:
                hello = json.loads(sock.makefile("rb").readline())
            except (OSError, ValueError):
                hello = {}
            if not isinstance(hello, dict) or hello.get("hello") != nonce:
                sock.close()  # not our agent
                continue
            sock.settimeout(None)
            self.agent_pid = int(hello["pid"])
            return _Channel(sock)

    def stop(self) -> None:
        """Power off (gracefully if the agent answers), then stop slirp and the switch."""
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
        uml = self._procs.get("uml")
        try:
            if uml is not None and uml.alive() and self._channel is not None and self._dead_reason is None:
                try:
                    acked = self._channel.request({"op": "poweroff"}, 5.0) is not None
                except GuestError:
                    acked = False
                try:
                    # The agent syncs first (bounded in the guest), then powers off.
                    uml.popen.wait(20.0 if acked else 0.1)
                except subprocess.TimeoutExpired:
                    pass
            if uml is not None:
                _kill_group_now(uml)
        finally:
            if self._channel is not None:
                self._channel.close()
            if self._listener is not None:
                self._listener.close()
            for name in ("slirpvde", "vde_switch"):
                if name in self._procs:
                    self._procs[name].stop(timeout=5.0)
            if self._sockdir is not None:
                shutil.rmtree(self._sockdir, ignore_errors=True)

    def power_off_now(self, reason: str) -> None:
        """Kill the kernel at once (it is hung); later requests raise GuestHung."""
        with self._state_lock:
            if self._dead_reason is None:
                self._dead_reason = reason
        uml = self._procs.get("uml")
        if uml is not None:
            _kill_group_now(uml)
        if self._channel is not None:
            self._channel.close()  # wakes every other waiter: slirp would keep the socket open

    def console_tail(self, lines: int = 40) -> str:
        if not self.console_log.exists():
            return "(no console output)"
        return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])

    # -- commands --------------------------------------------------------------------
    def _request(self, msg: Dict[str, Any], wait: float, what: str) -> Dict[str, Any]:
        if self._dead_reason is not None:
            raise GuestHung(f"the guest was powered off earlier: {self._dead_reason}")
        if self._channel is None or self._stopped:
            raise GuestError("the guest is not running")
        try:
            answer = self._channel.request(msg, wait)
        except GuestError:
            if self._dead_reason is not None:
                raise GuestHung(f"the guest was powered off: {self._dead_reason}") from None
            raise
        if answer is None:
            reason = f"no answer to {what} within {wait:.0f}s"
            self.power_off_now(reason)
            raise GuestHung(f"{reason}; the guest was powered off\n{self.console_tail(15)}")
        if "error" in answer:
            raise GuestError(f"the guest agent refused {what}: {answer['error']}")
        return answer["result"]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60,
        env: Optional[Mapping[str, str]] = None,
        input: Optional[bytes] = None,
        check: bool = False,
    ) -> GuestResult:
        """Run argv in the guest (own session; its group is SIGKILLed after timeout).

        env extends the guest's base environment (PATH, HOME=/root, LANG=C.UTF-8).
        """
        msg: Dict[str, Any] = {"op": "run", "argv": list(argv), "timeout": timeout}
        if env is not None:
            msg["env"] = dict(env)
        if input is not None:
            msg["input"] = base64.b64encode(input).decode()
        res = GuestResult(**self._request(msg, timeout + self.hang_grace, f"run {list(argv)[:3]}"))
        if check and (res.rc != 0 or res.timed_out):
            raise GuestCommandError(argv, res)
        return res

    def spawn(self, argv: Sequence[str], *, log: str, env: Optional[Mapping[str, str]] = None) -> int:
        """Start argv in the background in its own session; output goes to the guest file log."""
        msg: Dict[str, Any] = {"op": "spawn", "argv": list(argv), "log": log}
        if env is not None:
            msg["env"] = dict(env)
        return int(self._request(msg, CONTROL_TIMEOUT + self.hang_grace, "spawn")["pid"])

    def kill(self, pid: int, sig: int = signal.SIGTERM) -> bool:
        """Signal the process group of a spawned pid; False if it no longer exists."""
        msg = {"op": "kill", "pid": int(pid), "sig": int(sig)}
        return bool(self._request(msg, CONTROL_TIMEOUT + self.hang_grace, "kill")["delivered"])


def _validate(g: Guest) -> None:
    for word in (str(g.workdir), *map(str, g.shares.values())):
        if any(c.isspace() for c in word) or "," in word:
            raise ValueError(f"path {word!r} cannot go on a kernel or mount command line")
    for f in g.forwards:
        ipaddress.ip_address(f.guest_ip)  # ValueError for a bad address; IPv6 goes on lo too
        if not all(isinstance(p, int) and 0 < p < 65536 for p in (f.guest_port, f.host_port)):
            raise ValueError(f"forward {f}: ports must be integers in 1..65535")
    for name, ip in g.hosts.items():
        ipaddress.ip_address(ip)  # ValueError for a bad address
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"bad host name {name!r}")
    for guest_dir, host_dir in g.shares.items():
        if not guest_dir.startswith("/") or guest_dir.rstrip("/") in ("", "/"):
            raise ValueError(f"share {guest_dir!r}: the guest path must be absolute and not /")
        if not host_dir.is_dir():
            raise ValueError(f"share {guest_dir!r}: host directory {host_dir} does not exist")
    for name, target in g.sbin.items():
        if not name or "/" in name or not os.path.isabs(target) or not os.access(target, os.X_OK):
            raise ValueError(f"sbin {name!r}: {target!r} must be an absolute path to an executable")
    if g.mem_mb < 128:
        raise ValueError("mem_mb must be at least 128")


def _why_down(console: str) -> str:
    """One line: the setup step init reported as fatal, else the kernel's own reason."""
    for line in reversed(console.splitlines()):
        if "efsbed-guest: FATAL" in line:
            return line.strip()
    return kernels.boot_failure(console)


def _wait_for(cond: Any, proc: procs.BedProcess, deadline: float) -> None:
    delay = 0.005
    while not cond():
        if not proc.alive():
            raise GuestError(f"{proc.name} exited:\n{proc.log_tail()}")
        if time.monotonic() >= deadline:
            raise GuestError(f"{proc.name} did not come up in time")
        time.sleep(delay)  # short back-off while polling a condition
        delay = min(delay * 2, 0.1)


def _kill_group_now(proc: procs.BedProcess) -> None:
    """SIGKILL the kernel and all its host processes (a hung guest won't shut down)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.stop(timeout=5.0)  # reaps the leader and sweeps any member of its group left over
