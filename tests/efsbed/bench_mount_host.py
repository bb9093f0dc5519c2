"""`scripts/bench mount_host`: mount.efs's own cost on the host, with mount.nfs4 stubbed.

No NFS server or kernel mount is involved: inside a private mount and network namespace
(unshare), /sbin/mount.nfs4 is a bind-mounted `exit 0`, the loopback carries the ECS
credentials address (169.254.170.2, served by a thread here) and the mount target is
127.0.0.1 (stunnel connects only when a client does, and none does). So what is timed
is exactly what mount.efs adds: interpreter, imports, options, config, credentials,
certificate, port, tunnel start, records.

Run by run, interleaved:
- floor: what no helper can avoid: a stunnel client started by hand (config written,
  process started, waited for until it listens), then the stub mount.nfs4;
- `tls`, `tls,iam,accesspoint` with a profile's credentials and with an ECS credentials
  URI (each from a clean start: no tunnel, no record; the host's private key is kept);
- a mount that joins a live tunnel (same identity), against the bare stub mount.nfs4;
each mount.efs case alone and with a resident efsplug (a MountService in this process,
as the agent or `efsplug supervise` runs one) preparing it (efsplug.handoff).
`tls` with `tunnel_process = shared` and that process already serving another tunnel.
Then memory: PSS of the stunnel processes at 1 and at 50 live tunnels (distinct file
systems), and the ports in use once 50 more mounts joined them; with a process per
tunnel, and with one shared process.

`--baseline <dir>` times that efsplug package (PYTHONPATH) alternately with this one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from efsbed import rpmform
from efsbed.bed import MOUNT_EFS
from efsbed.ca import BedCA
from efsplug import handoff
from efsplug.mountservice import MountService
from efsplug.tunnel import listening_on

AP = "fsap-0123456789abcdef0"
CREDS_URI = "/v2/credentials/bench-task"
ECS_IP = "169.254.170.2"
STUB = "#!/bin/sh\nexit 0\n"
CASES = {
    "tls": "tls",
    "tls,iam,accesspoint (profile)": f"tls,iam,awsprofile=bench,accesspoint={AP}",
    "tls,iam,accesspoint (ECS URI)": f"tls,iam,awscredsuri={CREDS_URI},accesspoint={AP}",
}
INSTALLED = " [as installed]"  # mount.efs as the RPM installs it (efsbed.rpmform)
INSTALLED_RESIDENT = " [as installed, resident efsplug]"
KEY_ID, SECRET = "AKIAEFSBENCH00000000", "bench-secret-not-real"


class _Creds(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"AccessKeyId": KEY_ID, "SecretAccessKey": SECRET, "Token": "bench-token",
                           "Expiration": "2099-01-01T00:00:00Z", "RoleArn": "arn:aws:iam::1:role/bench"}).encode()
        self.send_response(200 if self.path == CREDS_URI else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class HostBench:
    def __init__(self, root: Path, baseline: Optional[str]) -> None:
        self.root, self.baseline = root, baseline
        self.state = root / "state"
        self.socket = root / "run" / "mount.sock"
        self.ca = BedCA.create(root / "ca")
        (root / "home" / ".aws").mkdir(parents=True)
        (root / "home" / ".aws" / "credentials").write_text(
            f"[bench]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
        text = f"[mount]\nregion = us-east-1\nstunnel_cafile = {self.ca.cert_path}\n[efsplug]\nstate_dir = {self.state}\n"
        (root / "efs-utils.conf").write_text(text)
        (root / "efs-utils-shared.conf").write_text(text + "tunnel_process = shared\n")
        self.shared = False  # tunnel_process = shared in the config mount.efs reads
        self.stunnel = shutil.which("stunnel") or shutil.which("stunnel4") or "stunnel"
        self.installed = rpmform.install(root / "installed")
        self.samples: Dict[str, List[float]] = {}

    def env(self, baseline: bool, handed: bool = False) -> Dict[str, str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": str(self.root / "home"),
               "EFSPLUG_CONFIG": str(self.root / ("efs-utils-shared.conf" if self.shared else "efs-utils.conf")),
               "AWS_EC2_METADATA_DISABLED": "true",
               handoff.SOCKET_ENV: str(self.socket if handed else self.root / "no-resident-efsplug.sock")}
        if baseline:
            env["PYTHONPATH"] = str(self.baseline)
        return env

    def variants(self) -> List[Tuple[str, bool, bool, Path]]:
        """(label, baseline, handed to the resident efsplug, mount.efs), alternated run by run:
        this checkout's .venv script, and mount.efs as the RPM installs it."""
        found = [("", False, False, MOUNT_EFS), (" [resident efsplug]", False, True, MOUNT_EFS),
                 (INSTALLED, False, False, self.installed), (INSTALLED_RESIDENT, False, True, self.installed)]
        return found + ([(" [baseline]", True, False, MOUNT_EFS)] if self.baseline else [])

    def add(self, name: str, ms: float) -> None:
        self.samples.setdefault(name, []).append(ms)

    def mount_efs(self, mnt: Path, options: str, fs: str = "fs-12345678", baseline: bool = False,
                  handed: bool = False, entry: Path = MOUNT_EFS) -> float:
        mnt.mkdir(exist_ok=True)
        start = time.perf_counter()
        done = subprocess.run([str(entry), fs, str(mnt), "-o", f"{options},mounttargetip=127.0.0.1"],
                              env=self.env(baseline, handed), capture_output=True, text=True, timeout=60)
        elapsed = (time.perf_counter() - start) * 1000
        if done.returncode != 0:
            raise RuntimeError(f"mount.efs -o {options} failed: {done.stderr.strip()}")
        return elapsed

    def records(self) -> List[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.state.glob("*.json"))]

    def clean(self) -> None:
        """Back to a clean start: tunnels stopped by their recorded pid, records and dirs gone."""
        for record in self.records():
            try:
                os.kill(record["tunnel"]["pid"], 9)
            except ProcessLookupError:
                pass
        for path in self.state.iterdir() if self.state.exists() else ():
            if path.name not in ("privateKey.pem", "ports"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def floor(self, port: int) -> float:
        conf = self.root / "floor.conf"
        start = time.perf_counter()
        conf.write_text(f"foreground = yes\npid =\n[efs]\nclient = yes\naccept = 127.0.0.1:{port}\n"
                        f"connect = 127.0.0.1:2049\nverify = 2\nCAfile = {self.ca.cert_path}\n")
        proc = subprocess.Popen([self.stunnel, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not listening_on(proc.pid, port):
            if proc.poll() is not None:
                raise RuntimeError("the floor's stunnel exited")
            time.sleep(0.0005)  # as fast as a hand-made loop would look
        subprocess.run(["/sbin/mount.nfs4", "127.0.0.1:/", "/mnt", "-o", f"port={port}"], check=True)
        elapsed = (time.perf_counter() - start) * 1000
        proc.kill()
        proc.wait()
        return elapsed

    def python(self, argv: List[str]) -> float:
        """An interpreter's start: this checkout's .venv pays for the editable install's
        import hook, which an RPM install does not have, on every mount.efs."""
        start = time.perf_counter()
        subprocess.run([*argv, "-c", "pass"], check=True)
        return (time.perf_counter() - start) * 1000

    def stub(self) -> float:
        start = time.perf_counter()
        subprocess.run(["/sbin/mount.nfs4", "127.0.0.1:/", "/mnt", "-o", "port=1"], check=True)
        return (time.perf_counter() - start) * 1000

    def run(self, runs: int) -> None:
        mnt, joiner = self.root / "mnt", self.root / "mnt-join"
        for i in range(runs + 1):  # run 0 warms caches and creates the private key: not counted
            counted = i > 0
            ms = self.floor(30999)
            if counted:
                self.add("floor", ms)
            for name, options in CASES.items():
                for label, baseline, handed, entry in self.variants():
                    ms = self.mount_efs(mnt, options, baseline=baseline, handed=handed, entry=entry)
                    self.clean()
                    if counted:
                        self.add(name + label, ms)
            for label, baseline, handed, entry in self.variants():
                if baseline:
                    continue  # a baseline may not know tunnel_process
                # tunnel_process = shared, a process already serving another file system's tunnel:
                # the new tunnel is a section added by SIGHUP.
                self.shared = True
                try:
                    self.mount_efs(mnt, CASES["tls"], fs="fs-87654321")
                    ms = self.mount_efs(joiner, CASES["tls"], handed=handed, entry=entry)
                finally:
                    self.shared = False
                    self.clean()
                if counted:
                    self.add("tls, shared process running" + label, ms)
            for label, baseline, handed, entry in self.variants():
                self.mount_efs(mnt, CASES["tls"])  # a live tunnel to join (the baseline may not)
                ms = self.mount_efs(joiner, CASES["tls"], baseline=baseline, handed=handed, entry=entry)
                self.clean()
                if counted:
                    self.add("second mount, same identity" + label, ms)
            if counted:
                self.add("bare mount.nfs4 (stub)", self.stub())
                self.add("python start: .venv (editable install), -c pass", self.python([str(MOUNT_EFS.parent / "python")]))
                self.add("python start: system python3, -c pass", self.python(["/usr/bin/python3"]))
                self.add("python start: system python3 -sS (as installed), -c pass",
                         self.python(["/usr/bin/python3", "-sS"]))

    def memory(self, count: int = 50) -> Dict[str, float]:
        """PSS of the stunnel processes at 1 and at count tunnels (distinct file systems), then
        the ports in use once count more mounts joined them; per-mount processes, then one
        shared process (tunnel_process = shared)."""
        result: Dict[str, float] = {}
        for shared, label in ((False, "per-mount processes"), (True, "tunnel_process = shared")):
            self.shared = shared
            try:
                result.update({f"{label}: {k}": v for k, v in self._memory(count).items()})
            finally:
                self.shared = False
                self.clean()
        result.update(self.one_process(count))
        return result

    def _memory(self, count: int) -> Dict[str, float]:
        def pss_kib() -> int:
            total = 0
            for pid in {record["tunnel"]["pid"] for record in self.records()}:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            return total

        self.mount_efs(self.root / "m0", "tls", fs="fs-10000000")
        one = pss_kib()
        added = []
        for n in range(1, count):
            start = time.perf_counter()
            self.mount_efs(self.root / f"m{n}", "tls", fs=f"fs-1{n:07d}")
            added.append((time.perf_counter() - start) * 1000)
        total = pss_kib()
        for n in range(count):  # a second mount of each: joins
            self.mount_efs(self.root / f"j{n}", "tls", fs=f"fs-1{n:07d}")
        listing = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
        ports = len([p for p in re.findall(r"127\.0\.0\.1(?:%\w+)?:(\d+)", listing) if 20049 <= int(p) < 21049])
        return {"tunnels": len({r["port"] for r in self.records()}), "stunnel processes":
                len({r["tunnel"]["pid"] for r in self.records()}), "mounts": len(self.records()), "listening ports": ports,
                "PSS of one tunnel, KiB": one, f"PSS of {count} tunnels, KiB": total,
                "PSS per additional tunnel, KiB": (total - one) / (count - 1),
                f"mount.efs of tunnel {count}, ms": added[-1]}

    def one_process(self, count: int) -> Dict[str, float]:
        """For comparison, not what efsplug runs: one stunnel serving count tunnels as sections;
        and the anonymous memory of a stunnel with one section, which no other process
        shares: the least a process per tunnel can cost, whatever its config."""
        def pss(pid: int, field: str = "Pss:") -> int:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(field))

        found = {}
        anon = 0
        for n in (1, count):
            conf = self.root / f"multi-{n}.conf"
            conf.write_text("foreground = yes\npid =\n" + "".join(
                f"[efs{i}]\nclient = yes\naccept = 127.0.0.1:{31000 + i}\nconnect = 127.0.0.1:2049\nverify = 2\n"
                f"CAfile = {self.ca.cert_path}\n" for i in range(n)))
            proc = subprocess.Popen([self.stunnel, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while not listening_on(proc.pid, 31000 + n - 1):
                    if proc.poll() is not None:
                        raise RuntimeError("the one-process stunnel exited")
                    time.sleep(0.001)
                found[n] = pss(proc.pid)
                if n == 1:
                    anon = pss(proc.pid, "Pss_Anon:")
            finally:
                proc.kill()
                proc.wait()
        return {f"one stunnel with {count} sections (comparison): PSS per additional section, KiB":
                (found[count] - found[1]) / (count - 1),
                "one stunnel, one section: anonymous PSS (its own heap and relocations), KiB": anon}


def _inner(args: argparse.Namespace) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{ECS_IP}/32", "dev", "lo"], check=True)
    server = ThreadingHTTPServer((ECS_IP, 80), _Creds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="efsplug-bench-") as tmp:
        root = Path(tmp)
        stub = root / "mount.nfs4"
        stub.write_text(STUB)
        stub.chmod(0o755)
        subprocess.run(["mount", "--bind", str(stub), "/sbin/mount.nfs4"], check=True)
        # The state directory on tmpfs, as /run/efs is: records are fsynced, and a disk's
        # fsync would time the disk rather than efsplug.
        (root / "state").mkdir(mode=0o750)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0750", "tmpfs", str(root / "state")], check=True)
        bench = HostBench(root, args.baseline)
        service = MountService.start_at(bench.socket)
        assert service is not None, "cannot serve mount.efs"
        try:
            bench.run(args.runs)
            memory = bench.memory()
        finally:
            service.stop()
            bench.clean()
            subprocess.run(["umount", str(root / "state")], check=True)
        json.dump({"samples": bench.samples, "memory": memory}, sys.stdout)
    server.shutdown()


def measure(runs: int, baseline: Optional[str] = None) -> dict:
    """Run the host part in its own mount and network namespace; its figures as data."""
    argv = ["unshare", "--mount", "--net", "--propagation", "private", sys.executable, "-m", "efsbed.bench_mount_host",
            "--inner", "--runs", str(runs)] + (["--baseline", baseline] if baseline else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"the host benchmark failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def report(data: dict) -> str:
    samples = data["samples"]
    floor = statistics.median(samples["floor"])
    stub = statistics.median(samples["bare mount.nfs4 (stub)"])
    lines = [f"host user space (mount.nfs4 stubbed), milliseconds, median of {len(samples['floor'])}",
             f"{'':44} {'median':>8} {'min':>8} {'max':>8} {'over floor':>11}"]
    for name, values in samples.items():
        base = stub if name.startswith(("second", "bare")) else floor
        plain = name in ("floor", "bare mount.nfs4 (stub)") or name.startswith("python")
        over = "" if plain else f"{statistics.median(values) - base:+11.1f}"
        lines.append(f"  {name:42} {statistics.median(values):8.1f} {min(values):8.1f} {max(values):8.1f} {over}")
    lines.append("  (a second mount is compared with the bare mount.nfs4, the others with the floor)")
    lines.append("  (rows without 'resident efsplug': mount.efs alone; on a systemd host that is only the first")
    lines.append("   TLS mount after boot, which starts efsplug-supervisor: every later mount is a resident case)")
    lines.append("memory and ports:")
    lines += [f"  {k}: {v:.0f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in data["memory"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench mount_host", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--baseline", help="a directory holding another efsplug package, timed alternately")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        _inner(args)
        return
    print(report(measure(args.runs, args.baseline)))


if __name__ == "__main__":
    main()
