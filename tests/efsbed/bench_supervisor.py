"""`scripts/bench supervisor`: CPU per second of the supervisor at 1,000 tracked mounts.

Steady state with synthetic records (TLS, half of them IAM with far-off renewal), a
synthetic NFS mount table (the host kernel has no NFS client) and one real listener
process standing in for the tunnels: it listens on all 1,000 ports, so liveness (pidfd)
and listening probes are real. Every mount is a Docker volume with a reference held, so
the reference checks run too. Side by side: a loop that re-reads everything every
second (every state file, the mount table, every tunnel's identity: pid, start time and
command line), the way a watchdog without events works; it does not even probe sockets. Each runs in its own process; CPU is that process's
user+system time over the window, after a warm-up.

    scripts/bench supervisor [--mounts 1000] [--seconds 70] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List

import psutil

from efsbed import procs

BASE_PORT = 31000
FS_ID = "fs-0123456789abcdef0"


def listener_main(ports: int) -> None:
    socks = []
    for i in range(ports):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", BASE_PORT + i))
        s.listen(1)
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes our stdin


def make_records(state_dir: Path, pid: int, count: int) -> None:
    from efsplug import state
    from efsplug.state import MountRecord
    from efsplug.tunnel import TunnelIdentity

    identity = TunnelIdentity.of(pid)
    now = datetime.now(timezone.utc)
    for i in range(count):
        iam = i % 2 == 0
        record = MountRecord(
            fs_id=FS_ID, mountpoint=f"/mnt/bench/v{i}", port=BASE_PORT + i, tunnel=identity, tls=True, iam=iam,
            region="us-east-1", config_file=str(state_dir / f"v{i}.conf"), mount_time=now - timedelta(hours=1),
            credential_source="instance" if iam else None,
            cert_not_before=now - timedelta(minutes=15) if iam else None,
            cert_not_after=now + timedelta(hours=3) if iam else None,
        )
        state.save(state_dir, record)
        (state_dir / state.file_name(record)[:-5]).mkdir(exist_ok=True)


def synthetic_table(count: int):
    from efsplug.mounttable import KernelMount

    return [KernelMount(100 + i, f"/mnt/bench/v{i}", "nfs4", "127.0.0.1:/",
                        f"rw,relatime,rw,vers=4.1,port={BASE_PORT + i},addr=127.0.0.1", BASE_PORT + i)
            for i in range(count)]


def supervisor_main(state_dir: str, count: int) -> None:
    from efsplug.config import parse_config
    from efsplug.supervisor.runner import Supervisor

    config = parse_config(f"[efsplug]\nstate_dir = {state_dir}\n[mount-watchdog]\npoll_interval_sec = 1\n").config
    table = synthetic_table(count)
    sup = Supervisor(config, references=lambda mountpoint: 1, mount_reader=lambda: table, environ={})
    sup.run_forever()


def reread_main(state_dir: str, count: int) -> None:
    """What a watchdog without events does: everything, every second."""
    from efsplug import state
    from efsplug.mounttable import ports_in_use
    from efsplug.tunnel import Tunnel

    table = synthetic_table(count)
    while True:
        start = time.monotonic()
        records, _ = state.load_all(Path(state_dir))
        ports_in_use(table)
        for r in records:  # liveness only (pid + start time + command line), as efs-utils' watchdog
            if r.tunnel is not None:
                Tunnel.from_identity(r.tunnel)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - start)))  # the loop's 1 s tick


def measure(argv: List[str], warmup: float, seconds: float, tag: str) -> float:
    child = procs.start("bench", argv, tag=tag)
    try:
        p = psutil.Process(child.pid)
        time.sleep(warmup)  # let the start-up reconciliation finish
        before = p.cpu_times()
        t0 = time.monotonic()
        time.sleep(seconds)  # the measurement window
        after = p.cpu_times()
        wall = time.monotonic() - t0
        assert child.alive(), f"{argv[-3]} exited"
        return ((after.user - before.user) + (after.system - before.system)) / wall
    finally:
        child.stop()


def main(argv: List[str]) -> int:
    if argv and argv[0] == "--child":
        {"listener": lambda: listener_main(int(argv[2])), "supervisor": lambda: supervisor_main(argv[2], int(argv[3])),
         "reread": lambda: reread_main(argv[2], int(argv[3]))}[argv[1]]()
        return 0
    parser = argparse.ArgumentParser(prog="scripts/bench supervisor")
    parser.add_argument("--mounts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=70.0, help="window; > 60 covers a reference-check round")
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args(argv)
    tag = procs.new_tag()
    me = [sys.executable, "-m", "efsbed.bench_supervisor", "--child"]
    workdir = Path(tempfile.mkdtemp(prefix="bench-supervisor-"))
    listener = procs.start("listener", me + ["listener", str(args.mounts)], tag=tag, keep_stdin_open=True)
    try:
        procs.wait_for_port(BASE_PORT + args.mounts - 1, process=listener)
        make_records(workdir, listener.pid, args.mounts)
        sup = measure(me + ["supervisor", str(workdir), str(args.mounts)], args.warmup, args.seconds, tag)
        loop = measure(me + ["reread", str(workdir), str(args.mounts)], args.warmup, args.seconds, tag)
    finally:
        listener.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"mounts": args.mounts, "window_s": args.seconds, "supervisor_cpu_pct": round(sup * 100, 3),
              "reread_loop_cpu_pct": round(loop * 100, 2), "ratio": round(loop / sup, 1) if sup else None}
    print(f"supervisor, event driven : {sup * 100:7.3f}% of one core")
    print(f"re-read everything each s: {loop * 100:7.2f}% of one core")
    print(f"ratio                    : {result['ratio']}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
