"""Guest side of tests/bed/test_agent_faults_guest.py: one plugin request, and the agent
SIGKILLed at a chosen point inside it.

Runs inside the kernel guest (stdlib only, so it starts fast):

    python agent_faults.py '<json spec>'

spec: {"socket", "pid": the agent's pid, "steps": [{"endpoint", "payload"}, ...],
       "kill_step": index or null, "trigger": {...}, "state_dir": efsplug's (/var/run/efs),
       "prefix": the volume's mount directory prefix, "mountpoint", "state_file", "volume"}

The steps are sent one after the other, as dockerd would; after each answer what exists
is recorded (see snapshot()). During the kill step the request goes out on one thread
while this one polls (~1 ms) for the trigger. When it fires the agent is frozen (SIGSTOP)
where it stands, what exists at that instant is recorded, and it is SIGKILLed: only its
pid, as the OOM killer or a crash would (the unit's KillMode=process). Its children
(mount.nfs4, umount) are left to finish on their own, as they would be. Nothing after
the kill step is sent.

Triggers:
  {"kind": "none"}                    never: the request alone
  {"kind": "delay", "seconds": s}     s after the request was sent
  {"kind": "changed", "path": p}      the file p was replaced or rewritten
  {"kind": "entry", "want": "present"|"absent", "suffix": s, "isdir": bool, "child": name,
   "in": dir, "prefix": p}            an entry <in>/<prefix>*<suffix> (a directory holding
                                      child); in and prefix default to the volume's own
  {"kind": "stunnel", "want": ...}    a stunnel whose config is under <state_dir>/<prefix>
  {"kind": "mount", "want": ...}      an NFS mount at the mountpoint

A trigger with "stall": "enter" or "exit" also has strace hold every rename(2) of the
agent (or every call in "calls") for STALL seconds before (or after) it runs, so a point
just before or just after a file is put in place -- the agent's state file above all,
whose rename is followed by the answer within microseconds -- is reached every time
instead of by luck.

Prints one JSON line: {"before": snapshot, "steps": [{"fired", "after", "took",
"answer": {"status", "body"} | null, "error", "snapshot"}, ...]}.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

ACCEPT = "application/vnd.docker.plugins.v1.2+json"
POLL = 0.001
REQUEST_TIMEOUT = 150.0
STALL = 0.5  # how long strace holds each rename: ample for the poll to see it, short enough
RENAMES = "rename,renameat,renameat2"
STRACE_ATTACH_TIMEOUT = 30.0
STRACE_EXIT_WAIT = 5.0


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("plugin", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def post(socket_path: str, endpoint: str, payload: Any) -> Dict[str, Any]:
    """What dockerd posts: no Content-Type, a trailing newline."""
    conn = _Unix(socket_path, REQUEST_TIMEOUT)
    try:
        body = (json.dumps(payload) + "\n").encode()
        conn.putrequest("POST", "/" + endpoint, skip_accept_encoding=True)
        conn.putheader("Accept", ACCEPT)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return {"status": resp.status, "body": json.loads(resp.read())}
    finally:
        conn.close()


# --- what exists ------------------------------------------------------------------------

def entries(spec: Dict[str, Any], suffix: str = "", want_dir: Optional[bool] = None,
            child: Optional[str] = None, where: Optional[str] = None, prefix: Optional[str] = None) -> List[str]:
    where = where or spec["state_dir"]
    prefix = spec["prefix"] if prefix is None else prefix
    try:
        names = os.listdir(where)
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith(prefix) or not name.endswith(suffix):
            continue
        path = os.path.join(where, name)
        if want_dir is not None and os.path.isdir(path) != want_dir:
            continue
        if child is not None and not os.path.exists(os.path.join(path, child)):
            continue
        found.append(name)
    return sorted(found)


def stunnels(spec: Dict[str, Any]) -> List[int]:
    # As written on its command line: /var/run/efs/..., the same directory as /run/efs.
    unders = {os.path.join(d, spec["prefix"]).encode() for d in (spec["state_dir"], os.path.realpath(spec["state_dir"]))}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 2 and os.path.basename(argv[0]).startswith(b"stunnel") and any(argv[1].startswith(u) for u in unders):
            pids.append(int(entry))
    return sorted(pids)


def mounted(spec: Dict[str, Any]) -> bool:
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == spec["mountpoint"] and fields[2] in ("nfs", "nfs4"):
                    return True
    except OSError:
        pass
    return False


def file_stamp(path: str) -> Optional[List[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def agent_volume(spec: Dict[str, Any]) -> Any:
    """The volume in the agent's state file; None if absent (or no file yet)."""
    try:
        with open(spec["state_file"]) as f:
            return json.load(f)["volumes"].get(spec["volume"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError):
        return "unreadable"


def snapshot(spec: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "dirs": entries(spec, want_dir=True),
        "certificates": entries(spec, want_dir=True, child="certificate.pem"),
        "records": entries(spec, suffix=".json", want_dir=False),
        "tunnels": stunnels(spec),
        "mounted": mounted(spec),
        "state": agent_volume(spec),
        "state_temps": entries(spec, suffix=".tmp", where=os.path.dirname(spec["state_file"]),
                               prefix="." + os.path.basename(spec["state_file"]) + "."),
    }


def condition(spec: Dict[str, Any], t: Dict[str, Any], started: Dict[str, float]) -> Callable[[], bool]:
    kind = t["kind"]
    if kind == "none":
        return lambda: False
    if kind == "delay":
        return lambda: "at" in started and time.monotonic() - started["at"] >= t["seconds"]
    if kind == "changed":
        before = file_stamp(t["path"])
        return lambda: file_stamp(t["path"]) != before
    present = t.get("want", "present") == "present"
    if kind == "entry":
        suffix, want_dir, child, where, prefix = t.get("suffix", ""), t.get("isdir"), t.get("child"), t.get("in"), \
            t.get("prefix")
        return lambda: bool(entries(spec, suffix, want_dir, child, where, prefix)) == present
    if kind == "stunnel":
        return lambda: bool(stunnels(spec)) == present
    if kind == "mount":
        return lambda: mounted(spec) == present
    raise SystemExit(f"unknown trigger {kind!r}")


def tracers(pid: int) -> List[int]:
    """TracerPid of every thread of pid."""
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        found.append(int(line.split()[1]))
        except OSError:
            continue
    return found


def start_stall(pid: int, where: str, calls: str) -> "subprocess.Popen[bytes]":
    """strace holding every call of the agent (threads made later included) for STALL s,
    before it runs (where="enter") or after (where="exit"). Children are let go at exec."""
    micros = int(STALL * 1e6)
    argv = ["strace", "-f", "-b", "execve", "-qq", "-o", "/dev/null", "-e", f"trace={calls}",
            "-e", f"inject={calls}:delay_{where}={micros}", "-p", str(pid)]
    # Its stderr to a file, not a pipe nobody reads while it runs.
    log = tempfile.TemporaryFile()
    tracer = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + STRACE_ATTACH_TIMEOUT
    while not (tracers(pid) and all(t == tracer.pid for t in tracers(pid))):
        if tracer.poll() is not None or time.monotonic() > deadline:
            tracer.kill()
            tracer.wait()
            log.seek(0)
            raise SystemExit(f"strace did not attach to {pid}: {log.read().decode(errors='replace')[-500:]}")
        time.sleep(0.01)  # polling /proc for the attach, bounded
    return tracer


def stop_stall(tracer: "subprocess.Popen[bytes]", killed: bool) -> None:
    """strace ends with its last tracee, or detaches on SIGINT from a live agent (no kill).
    With the agent dead it has nothing left to do: stopped if it lingers."""
    if tracer.poll() is None and not killed:
        tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(STRACE_EXIT_WAIT)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait()


def main() -> None:
    spec = json.loads(sys.argv[1])
    out: Dict[str, Any] = {"before": snapshot(spec), "steps": []}
    for index, step in enumerate(spec["steps"]):
        trigger = spec["trigger"] if index == spec.get("kill_step") else {"kind": "none"}
        result = one(spec, step, trigger)
        out["steps"].append(result)
        if result["fired"] or result["answer"] is None:
            break  # the agent is dead, or the request failed: the host decides what next
    print(json.dumps(out))


def one(spec: Dict[str, Any], step: Dict[str, Any], trigger: Dict[str, Any]) -> Dict[str, Any]:
    """One request, with trigger; the snapshot is taken at the kill, else after the answer."""
    pid = int(spec["pid"])
    tracer = start_stall(pid, trigger["stall"], trigger.get("calls", RENAMES)) if trigger.get("stall") else None
    result: Dict[str, Any] = {"fired": False}
    try:
        result = request_and_kill(spec, step, trigger, pid)
        return result
    finally:
        if tracer is not None:
            stop_stall(tracer, result["fired"])


def request_and_kill(spec: Dict[str, Any], step: Dict[str, Any], trigger: Dict[str, Any], pid: int) -> Dict[str, Any]:
    started: Dict[str, float] = {}
    outcome: Dict[str, Any] = {"answer": None, "error": None}
    fire = condition(spec, trigger, started)  # baselines are taken before the request goes out

    def request() -> None:
        started["at"] = time.monotonic()
        try:
            outcome["answer"] = post(spec["socket"], step["endpoint"], step["payload"])
        except Exception as exc:  # noqa: BLE001 - the kill makes the request fail: that is the point
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        outcome["done"] = time.monotonic()

    sender = threading.Thread(target=request, daemon=True)
    sender.start()
    fired, after = False, None
    snap: Optional[Dict[str, Any]] = None
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while time.monotonic() < deadline:
        if fire():
            os.kill(pid, signal.SIGSTOP)
            after = time.monotonic() - started.get("at", time.monotonic())
            snap = snapshot(spec)
            os.kill(pid, signal.SIGKILL)
            fired = True
            break
        if not sender.is_alive() and trigger["kind"] != "delay":
            break  # answered (the point was never reached, or there was none)
        time.sleep(POLL)
    sender.join(REQUEST_TIMEOUT)
    took = outcome.get("done", time.monotonic()) - started.get("at", 0.0)
    return {"fired": fired, "after": after, "took": took, "answer": outcome["answer"], "error": outcome["error"],
            "snapshot": snap if fired else snapshot(spec)}


if __name__ == "__main__":
    main()
