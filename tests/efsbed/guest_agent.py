"""The guest's control agent: runs the host's commands inside the kernel guest.

Runs inside the guest under /usr/bin/python3 (stdlib only, Python 3.9+), started by
guest_init.py. It connects back to the host's listener at 10.0.2.2:<port> and speaks JSON
lines both ways:

    host -> guest  {"id": 7, "op": "run", "argv": [...], "timeout": 60, "env": {...}, "input": "<base64>"}
    guest -> host  {"id": 7, "result": {...}}   or   {"id": 7, "error": "why"}

Ops: run, spawn, kill, poweroff, ping. Each request gets its own thread, so commands run
concurrently; a bad request gets an error answer and never ends the agent. When the
connection ends the agent exits and PID 1 powers the guest off.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any, Dict, List

HOST = "10.0.2.2"
RB_POWER_OFF = 0x4321FEDC
CONNECT_DEADLINE = 60.0
# After the command itself has exited, how long to wait for its pipes to close: a daemon
# it started may keep them open forever, and its output is not the command's answer.
PIPE_DRAIN = 2.0
# After a timeout's SIGKILL, how long to wait for the process to be gone (D state may keep it).
KILL_WAIT = 5.0
SYNC_WAIT = 10.0


class BadRequest(Exception):
    pass


def _env(extra: Any) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("EFSBED_CONFIG", None)
    if extra is None:
        return env
    if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise BadRequest("env must map strings to strings")
    env.update(extra)
    return env


def _argv(req: Dict[str, Any]) -> List[str]:
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise BadRequest("argv must be a non-empty list of strings")
    return argv


def _drain(stream: IO[bytes], into: List[bytes]) -> None:
    try:
        for chunk in iter(lambda: stream.read1(65536), b""):
            into.append(chunk)
    except (OSError, ValueError):
        pass


def _feed(stream: IO[bytes], data: bytes) -> None:
    try:
        stream.write(data)
    except (OSError, ValueError):
        pass  # the command does not read its input: not our failure
    finally:
        try:
            stream.close()
        except OSError:
            pass


def op_run(req: Dict[str, Any]) -> Dict[str, Any]:
    argv = _argv(req)
    timeout = req.get("timeout", 60)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise BadRequest("timeout must be a positive number")
    data = req.get("input")
    stdin_data = base64.b64decode(data) if isinstance(data, str) else None
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(req.get("env")),
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        # Same shape as a shell's "command not found": the caller sees rc 127 and why.
        return {"rc": 127, "stdout": "", "stderr": f"{argv[0]}: {exc}\n", "duration": 0.0, "timed_out": False}
    out: List[bytes] = []
    err: List[bytes] = []
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
    ]
    for t in readers:
        t.start()
    if stdin_data is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin_data), daemon=True).start()
    timed_out = False
    try:
        rc = proc.wait(timeout=float(timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            threading.Thread(target=proc.wait, daemon=True).start()  # reap it whenever it goes
        rc = -signal.SIGKILL
    duration = time.monotonic() - started
    drain_until = time.monotonic() + PIPE_DRAIN
    for t in readers:
        t.join(max(0.0, drain_until - time.monotonic()))
    return {
        "rc": rc,
        "stdout": b"".join(out).decode(errors="replace"),
        "stderr": b"".join(err).decode(errors="replace"),
        "duration": duration,
        "timed_out": timed_out,
    }


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def op_spawn(req: Dict[str, Any]) -> Dict[str, Any]:
    argv = _argv(req)
    log = req.get("log")
    if not isinstance(log, str) or not log.startswith("/"):
        raise BadRequest("log must be an absolute guest path")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
            env=_env(req.get("env")), cwd="/", start_new_session=True,
        )
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it ends
    return {"pid": proc.pid}


def op_kill(req: Dict[str, Any]) -> Dict[str, Any]:
    pid, sig = req.get("pid"), req.get("sig", signal.SIGTERM)
    if not isinstance(pid, int) or pid <= 1 or not isinstance(sig, int):
        raise BadRequest("pid must be an integer > 1 and sig an integer")
    return {"delivered": _killpg(pid, sig)}


def power_off() -> None:
    syncer = threading.Thread(target=os.sync, daemon=True)
    syncer.start()
    syncer.join(SYNC_WAIT)  # a dead hard NFS mount can block sync forever
    ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)
    os._exit(1)


OPS = {"run": op_run, "spawn": op_spawn, "kill": op_kill, "ping": lambda req: {"pid": os.getpid()}}


class Agent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()

    def send(self, msg: Dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self.send_lock:
            self.sock.sendall(data)

    def handle(self, line: bytes) -> None:
        req_id: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise BadRequest("a request must be a JSON object")
            req_id = req.get("id")
            op = req.get("op")
            if op == "poweroff":
                self.send({"id": req_id, "result": {}})
                power_off()
            if op not in OPS:
                raise BadRequest(f"unknown op {op!r}")
            reply: Dict[str, Any] = {"id": req_id, "result": OPS[op](req)}
        except Exception as exc:  # noqa: BLE001 - any failure becomes an answer, never a crash
            reply = {"id": req_id, "error": f"{type(exc).__name__}: {exc}"}
        try:
            self.send(reply)
        except OSError:
            pass  # the host went away; serve() notices and ends

    def serve(self) -> None:
        reader = self.sock.makefile("rb")
        for line in reader:
            if line.strip():
                threading.Thread(target=self.handle, args=(line,), daemon=True).start()


def connect(port: int) -> socket.socket:
    deadline = time.monotonic() + CONNECT_DEADLINE
    delay = 0.05
    while True:
        try:
            return socket.create_connection((HOST, port), timeout=5.0)
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise SystemExit(f"efsbed-agent: cannot reach {HOST}:{port}: {exc}")
        time.sleep(delay)  # back-off while slirp and the switch come up
        delay = min(delay * 2, 1.0)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    sock = connect(int(cfg["port"]))
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    agent = Agent(sock)
    agent.send({"hello": cfg["nonce"], "pid": os.getpid()})
    agent.serve()


if __name__ == "__main__":
    main()
