"""`scripts/bench agent`: the agent's concurrency and footprint, on the host.

1. 50 Mounts of distinct volumes issued in parallel vs one Mount (target: ratio <= 3x).
   The host kernel has no NFS, so the agent runs in process with a mounter that takes a
   fixed, realistic time (default 0.7 s: a TLS+IAM+access point mount in the kernel guest
   takes 0.7-2 s); everything else is real: the unix socket, HTTP, per-volume locks and
   the fsynced state write per Mount. The ratio shows what the agent adds around mounts.
2. Get and List p99 with 1,000 volumes while a mount is held in flight (target <= 5 ms).
3. RSS of an idle `efsplug agent` process with its default imports (target <= 40 MB).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import psutil

from efsbed import procs
from efsbed.agent_harness import FakeMounter, PluginClient, plugin_with, serve_in_process, start_agent
from efsplug.agent.plugin import Plugin
from efsplug.agent.store import Store
from efsplug.agent.volumes import new_volume

OPTS = {"type": "efs", "device": "fs-0123456789abcdef0",
        "o": "tls,iam,awscredsuri=/v2/credentials/bench,accesspoint=fsap-0123456789abcdef0"}
MOUNT_ID = "e" * 64


def p99(samples: List[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def parallel_mounts(workdir: Path, count: int, latency: float) -> Dict[str, float]:
    plugin = plugin_with(workdir, FakeMounter(latency=latency))
    sock = workdir / "p.sock"
    with serve_in_process(plugin, sock):
        with PluginClient(sock) as c:
            for i in range(count + 1):
                assert c.call("VolumeDriver.Create", {"Name": f"v{i}", "Opts": OPTS}).body["Err"] == ""
            start = time.perf_counter()
            assert c.call("VolumeDriver.Mount", {"Name": f"v{count}", "ID": MOUNT_ID}).body["Err"] == ""
            single = time.perf_counter() - start
        clients = [PluginClient(sock, timeout=120) for _ in range(count)]
        for c in clients:
            c.call("VolumeDriver.Capabilities", {})  # connected before the clock starts
        barrier = threading.Barrier(count + 1)
        errors: List[str] = []

        def one(i: int) -> None:
            barrier.wait(30)
            err = clients[i].call("VolumeDriver.Mount", {"Name": f"v{i}", "ID": MOUNT_ID}).body["Err"]
            if err:
                errors.append(err)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        barrier.wait(30)
        start = time.perf_counter()
        for t in threads:
            t.join(300)
        together = time.perf_counter() - start
        for c in clients:
            c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} parallel mounts failed: {errors[0]}")
    return {"single_s": single, "parallel_s": together, "ratio": together / single}


def reads_during_a_mount(workdir: Path, volumes: int, requests: int) -> Dict[str, float]:
    gate = threading.Event()
    mounter = FakeMounter(gate=gate)
    root = workdir / "volumes"
    initial = {f"v{i:04d}": new_volume(f"v{i:04d}", OPTS, root, "2024-01-01T00:00:00Z") for i in range(volumes)}
    store = Store(workdir / "state.json")
    store.save(initial)
    plugin = Plugin(store, root, mounter=mounter, initial=initial)
    sock = workdir / "r.sock"
    get_ms: List[float] = []
    list_ms: List[float] = []
    with serve_in_process(plugin, sock):
        holder = threading.Thread(
            target=lambda: PluginClient(sock, timeout=120).call("VolumeDriver.Mount", {"Name": "v0000", "ID": MOUNT_ID}))
        holder.start()
        try:
            if not mounter.entered.acquire(timeout=30):
                raise RuntimeError("the held mount never started")
            with PluginClient(sock) as c:
                for i in range(requests):
                    start = time.perf_counter()
                    c.call("VolumeDriver.Get", {"Name": f"v{i % volumes:04d}"})
                    get_ms.append((time.perf_counter() - start) * 1000)
                    if i % 5 == 0:
                        start = time.perf_counter()
                        listed = c.call("VolumeDriver.List", {}).body["Volumes"]
                        list_ms.append((time.perf_counter() - start) * 1000)
                        assert len(listed) == volumes
            in_flight = holder.is_alive()
        finally:
            gate.set()
            holder.join(30)
    if not in_flight:
        raise RuntimeError("the mount finished before the reads did: the figure would not mean anything")
    return {"get_p99_ms": p99(get_ms), "get_median_ms": statistics.median(get_ms),
            "list_p99_ms": p99(list_ms), "list_median_ms": statistics.median(list_ms)}


def idle_rss(workdir: Path) -> Dict[str, float]:
    tag = procs.new_tag()
    agent = start_agent(workdir, tag=tag)
    try:
        with PluginClient(agent.socket_path) as c:  # a few requests first: idle, not untouched
            c.call("VolumeDriver.Create", {"Name": "v1", "Opts": OPTS})
            c.call("VolumeDriver.List", {})
        rss = psutil.Process(agent.proc.pid).memory_info().rss / 1e6
    finally:
        agent.proc.stop()
    return {"rss_mb": rss}


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench agent", description=__doc__.splitlines()[0])
    parser.add_argument("--mounts", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.7, help="modelled seconds per mount (default 0.7)")
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        work = Path(tmp)
        for sub in ("mounts", "reads", "rss"):
            (work / sub).mkdir()
        m = parallel_mounts(work / "mounts", args.mounts, args.latency)
        r = reads_during_a_mount(work / "reads", args.volumes, args.requests)
        s = idle_rss(work / "rss")
    rows = [
        (f"{args.mounts} parallel Mounts / 1 Mount (modelled mount {args.latency:g} s)",
         f"{m['ratio']:.2f}x ({m['parallel_s']:.2f} s / {m['single_s']:.2f} s)", m["ratio"] <= 3.0, "<= 3x"),
        (f"Get p99, {args.volumes} volumes, a mount in flight",
         f"{r['get_p99_ms']:.2f} ms (median {r['get_median_ms']:.2f})", r["get_p99_ms"] <= 5.0, "<= 5 ms"),
        (f"List p99, {args.volumes} volumes, a mount in flight",
         f"{r['list_p99_ms']:.2f} ms (median {r['list_median_ms']:.2f})", r["list_p99_ms"] <= 5.0, "<= 5 ms"),
        ("agent RSS, idle", f"{s['rss_mb']:.1f} MB", s["rss_mb"] <= 40.0, "<= 40 MB"),
    ]
    width = max(len(name) for name, *_ in rows)
    for name, value, ok, target in rows:
        print(f"{name:<{width}}  {value:<32} target {target:<9} {'ok' if ok else 'MISSED'}")
    return 0 if all(ok for *_, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
