"""`scripts/bench mount`: how long `mount -t efs` takes in the kernel guest, and where it goes.

First the host user-space part (bench_mount_host: mount.nfs4 stubbed). Then it starts its
own Bed and in the guest runs, run by run: the floor (a stunnel client started by hand
until it listens, then mount.nfs4), `mount -t efs -v <fs> <dir> -o tls` and a second
mount of the same file system (which joins the first one's tunnel), and `-o
tls,iam,accesspoint=<ap>` (instance role credentials); each first mount from the same
starting point (no tunnel, no state; the private key, created once per host, is kept, as
on a real host). Times are taken inside the guest (date +%s%N around the command), so
the command channel is not counted; the phase breakdown is what `mount.efs -v` prints.
Last, a bare mount.nfs4 through a running tunnel and a bare Python start.

`--baseline <git rev>` also times that revision's efsplug (extracted with git archive,
put first on PYTHONPATH), alternating run by run, so a before/after comparison sees the
same machine load: the bed shares its two cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from efsbed import bench_mount_host, rpmform
from efsbed.bed import Bed, REPO
from efsbed.guest import GuestResult

MOUNTPOINT = "/mnt/bench"
STATE_DIR = "/run/efs"
PYTHON = str(REPO / ".venv" / "bin" / "python")
PHASES = ("resolve", "credentials", "share", "port", "certificate", "tunnel", "mount.nfs4")
NFS_OPTIONS = "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"
_PHASE_RE = re.compile(r"([A-Za-z][\w.]*)=([0-9.]+)ms")
_TIMED = 'set -e; s=$(date +%s%N); "$@"; e=$(date +%s%N); echo "ELAPSED_US $(( (e - s) / 1000 ))"'


@dataclass
class Samples:
    values: Dict[str, List[float]] = field(default_factory=dict)  # name -> milliseconds

    def add(self, name: str, ms: float) -> None:
        self.values.setdefault(name, []).append(ms)

    def row(self, name: str) -> Optional[str]:
        got = self.values.get(name)
        if not got:
            return None
        return f"{statistics.median(got):9.1f} {min(got):9.1f} {max(got):9.1f} {len(got):4d}"


def timed(bed: Bed, argv: Sequence[str], timeout: float = 120) -> GuestResult:
    """Run argv in the guest under a guest-side clock; fail loudly if it fails."""
    res = bed.run(["sh", "-c", _TIMED, "timed", *argv], timeout=timeout)
    if res.rc != 0 or res.timed_out:
        raise RuntimeError(f"{list(argv)} failed (rc {res.rc}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def elapsed_ms(res: GuestResult) -> float:
    found = re.search(r"ELAPSED_US (\d+)", res.stdout)
    if not found:
        raise RuntimeError(f"no elapsed time in {res.stdout!r}")
    return int(found.group(1)) / 1000.0


def phases(res: GuestResult) -> Dict[str, float]:
    line = next((l for l in (res.stdout + res.stderr).splitlines() if "mount.efs: mounted" in l), "")
    return {name: float(ms) for name, ms in _PHASE_RE.findall(line)}


def state_records(bed: Bed) -> List[dict]:
    out = bed.run(["sh", "-c", f"cat {STATE_DIR}/*.json 2>/dev/null || true"]).stdout
    return [json.loads(chunk) for chunk in re.split(r"(?<=\})\s*(?=\{)", out.strip()) if chunk.strip()]


def undo_mount(bed: Bed, *, keep_tunnel: bool = False) -> List[dict]:
    """Unmount, then (unless keep_tunnel) stop the tunnels by pid and drop their state."""
    bed.run(["umount", MOUNTPOINT], timeout=60)
    records = state_records(bed)
    if not keep_tunnel:
        for record in records:
            bed.run(["kill", str(record["tunnel"]["pid"])])
            bed.run(["rm", "-rf", *record["files_created"]])
        bed.run(["sh", "-c", f"rm -f {STATE_DIR}/*.json"])
    return records


def extract(rev: str, target: Path) -> None:
    """rev's efsplug package, from git, under target."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "efsplug"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)


def baseline_checkout(bed: Bed, rev: str) -> str:
    """rev's efsplug package under the bed's workdir (visible in the guest); the PYTHONPATH for it."""
    target = bed.workdir / "baseline"
    target.mkdir()
    extract(rev, target)
    where = bed.run([PYTHON, "-c", "import efsplug; print(efsplug.__file__)"], env={"PYTHONPATH": str(target)})
    if not where.stdout.startswith(str(target)):
        raise RuntimeError(f"the baseline is not what the guest imports: {where.stdout or where.stderr}")
    return str(target)


def measure(bed: Bed, samples: Samples, command: List[str], env: Optional[Dict[str, str]], counted: bool) -> None:
    res = bed.run(["sh", "-c", _TIMED, "timed", *command], timeout=120, env=env)
    if res.rc != 0 or res.timed_out:
        raise RuntimeError(f"{command} failed (rc {res.rc}): {res.stderr.strip() or res.stdout.strip()}")
    total = elapsed_ms(res)
    if not counted:
        samples.add("first run (creates key)", total)
        return
    samples.add("total", total)
    for name, ms in phases(res).items():
        samples.add(name, ms)
    samples.add("overhead", total - phases(res).get("mount.nfs4", 0.0))


FLOOR = r"""
set -e
port=30999; conf=/tmp/bench-floor.conf
s=$(date +%s%N)
printf 'foreground = yes\npid =\n[efs]\nclient = yes\naccept = 127.0.0.1:%s\nconnect = %s:2049\nverify = 2\nCAfile = %s\ncheckHost = %s\n' \
  $port "$1" "$2" "$3" > $conf
stunnel $conf >/dev/null 2>&1 & pid=$!
while ! grep -q ":$(printf %04X $port) 00000000:0000 0A" /proc/net/tcp; do :; done
/sbin/mount.nfs4 127.0.0.1:/ "$4" -o "$5,port=$port"
e=$(date +%s%N); echo "ELAPSED_US $(( (e - s) / 1000 ))"
umount "$4"; kill $pid; wait $pid || true
"""


def floor(bed: Bed) -> float:
    """A stunnel client started by hand until it listens, then mount.nfs4: what no helper avoids."""
    res = bed.run(["sh", "-c", FLOOR, "floor", bed.seeded.mount_target_ip, str(bed.ca.cert_path), bed.dns_name,
                   MOUNTPOINT, NFS_OPTIONS], timeout=120)
    if res.rc != 0:
        raise RuntimeError(f"the floor failed: {res.stderr.strip()}")
    return elapsed_ms(res)


RESIDENT_SOCKET = "/run/efsplug/bench.sock"
ALONE = {"EFSPLUG_MOUNT_SOCKET": "/run/efsplug/no-resident-efsplug.sock"}
RESIDENT = {"EFSPLUG_MOUNT_SOCKET": RESIDENT_SOCKET}
RESIDENT_LABEL = " [resident efsplug]"
INSTALLED_LABEL = " [as installed]"  # mount.efs as the RPM installs it (efsbed.rpmform)
INSTALLED_RESIDENT_LABEL = " [as installed, resident efsplug]"
# A mount service alone, as the agent and `efsplug supervise` run one, without their
# supervision (which would restart the tunnels this benchmark kills between runs).
SERVICE = ("import signal; from pathlib import Path; from efsplug.mountservice import MountService; "
           f"s = MountService.start_at(Path({RESIDENT_SOCKET!r})); assert s; signal.sigwait([signal.SIGTERM])")


def start_service(bed: Bed) -> int:
    pid = bed.guest.spawn([PYTHON, "-c", SERVICE], log="/tmp/bench-service.log")
    deadline = time.monotonic() + 60
    while bed.run(["test", "-S", RESIDENT_SOCKET]).rc != 0:
        if time.monotonic() > deadline or not bed.guest.kill(pid, 0):
            raise RuntimeError(f"the mount service did not start: {bed.run(['cat', '/tmp/bench-service.log']).stdout}")
    return pid


def bench(bed: Bed, runs: int, baseline: Optional[Dict[str, Samples]] = None,
          baseline_env: Optional[Dict[str, str]] = None) -> Dict[str, Samples]:
    """Per case (tls, tls,iam,accesspoint), alone and prepared by a resident efsplug, the
    samples; interleaved with the floor run by run."""
    ap = bed.access_points[0].id
    # tls last: its tunnel is kept after the last run, for the bare mount.nfs4 below
    cases = {"tls,iam,accesspoint": f"tls,iam,accesspoint={ap}", "tls": "tls"}
    installed = rpmform.install(bed.workdir / "installed")  # mount.efs as the RPM installs it
    variants = [("", ALONE, None), (RESIDENT_LABEL, RESIDENT, None),
                (INSTALLED_LABEL, ALONE, installed), (INSTALLED_RESIDENT_LABEL, RESIDENT, installed)]
    found = {name + label: Samples() for name in cases for label, _, _ in variants}
    shared = Samples()
    bed.run(["mkdir", "-p", MOUNTPOINT, MOUNTPOINT + "-2"], timeout=30)
    service = start_service(bed)
    for i in range(runs + 1):  # run 0 warms caches and creates the private key: not counted
        if i:
            shared.add("floor", floor(bed))
        for name, options in cases.items():
            command = ["mount", "-t", "efs", "-v", bed.fs_id, MOUNTPOINT, "-o", options]
            if baseline is not None:
                measure(bed, baseline.setdefault(name, Samples()), command, dict(baseline_env or {}, **ALONE),
                        counted=bool(i))
                undo_mount(bed)
            for label, env, entry in variants:
                with helper_at_sbin(bed, entry):
                    measure(bed, found[name + label], command, env, counted=bool(i))
                    if name == "tls":  # a second mount with the same identity joins the tunnel
                        second = ["mount", "-t", "efs", bed.fs_id, MOUNTPOINT + "-2", "-o", options]
                        took = elapsed_ms(bed.run(["sh", "-c", _TIMED, "timed", *second], timeout=120, env=env))
                        if i:
                            shared.add("second mount, same identity" + label, took)
                        bed.run(["umount", MOUNTPOINT + "-2"], timeout=60)
                undo_mount(bed, keep_tunnel=(i == runs and name == "tls" and label == INSTALLED_RESIDENT_LABEL))
    bed.guest.kill(service, 15)
    (record,) = [r for r in state_records(bed) if r["mountpoint"] == MOUNTPOINT]
    nfs = ["/sbin/mount.nfs4", "127.0.0.1:/", MOUNTPOINT, "-o", f"{NFS_OPTIONS},port={record['port']}"]
    for _ in range(runs):
        shared.add("bare mount.nfs4", elapsed_ms(timed(bed, nfs)))
        bed.run(["umount", MOUNTPOINT], timeout=60)
    bed.run(["kill", str(record["tunnel"]["pid"])])
    bed.run(["rm", "-rf", STATE_DIR])
    for _ in range(runs):
        shared.add("python start", elapsed_ms(timed(bed, [PYTHON, "-c", "pass"])))
        shared.add("python start, as installed", elapsed_ms(timed(bed, [rpmform.SYSTEM_PYTHON, "-sS", "-c", "pass"])))
    return {**found, "": shared}


@contextlib.contextmanager
def helper_at_sbin(bed: Bed, entry: Optional[Path]) -> Iterator[None]:
    """mount(8) runs entry as /sbin/mount.efs meanwhile (None: the guest's own, this checkout's)."""
    if entry is None:
        yield
        return
    bed.run(["mount", "--bind", str(entry), "/sbin/mount.efs"], check=True)
    try:
        yield
    finally:
        bed.run(["umount", "/sbin/mount.efs"], check=True)


def report(samples: Samples, runs: int, title: str = "") -> str:
    lines = [
        f"mount -t efs -o {title}, {runs} runs, milliseconds",
        f"{'':40} {'median':>9} {'min':>9} {'max':>9} {'n':>4}",
    ]
    rows = [(f"  phase {name}", name) for name in PHASES]
    rows += [
        ("total: command start to mounted", "total"),
        ("helper overhead (total - its mount.nfs4)", "overhead"),
        ("first run (creates the private key)", "first run (creates key)"),
    ]
    for label, name in rows:
        row = samples.row(name)
        if row:
            lines.append(f"{label:40} {row}")
    return "\n".join(lines)


def summary(found: Dict[str, Samples]) -> str:
    """The figures issue 12 sets targets for, side by side with the floor."""
    common = found[""]
    med = lambda s, name: statistics.median(s.values[name])  # noqa: E731
    floor_ms, bare = med(common, "floor"), med(common, "bare mount.nfs4")
    lines = ["kernel guest, medians in milliseconds",
             f"  {'floor: stunnel by hand until it listens, then mount.nfs4':62} {floor_ms:8.1f}"]
    for name, target in (("tls", 2.5), ("tls,iam,accesspoint", 3.0)):
        for label in ("", RESIDENT_LABEL, INSTALLED_LABEL, INSTALLED_RESIDENT_LABEL):
            total = med(found[name + label], "total")
            lines.append(f"  {'mount -t efs -o ' + name + label:62} {total:8.1f}  {total / floor_ms:4.2f}x the floor"
                         f" (target <= {target}x)")
    lines.append(f"  {'bare mount.nfs4 through a running tunnel':62} {bare:8.1f}")
    for label in ("", RESIDENT_LABEL, INSTALLED_LABEL, INSTALLED_RESIDENT_LABEL):
        second = med(common, "second mount, same identity" + label)
        lines.append(f"  {'-o tls, a second mount joining the tunnel' + label:62} {second:8.1f}  "
                     f"{second - bare:+.1f} over the bare mount.nfs4")
    lines.append(f"  {'python start (venv, -c pass)':62} {med(common, 'python start'):8.1f}")
    lines.append(f"  {'python start (system python3 -sS, as installed, -c pass)':62} "
                 f"{med(common, 'python start, as installed'):8.1f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench mount", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs (default 10, at least 10 for the report)")
    parser.add_argument("--baseline", metavar="REV", help="also time this git revision's efsplug, interleaved")
    parser.add_argument("--guest-only", action="store_true", help="skip the host user-space part")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="efsbed-bench-"))
    try:
        baseline: Optional[Dict[str, Samples]] = {} if args.baseline else None
        host = None
        if not args.guest_only:
            base_dir = None
            if args.baseline:
                base_dir = workdir / "host-baseline"
                base_dir.mkdir()
                extract(args.baseline, base_dir)
            host = bench_mount_host.measure(max(args.runs, 1), str(base_dir) if base_dir else None)
        with Bed(workdir / "bed") as bed:
            env = {"PYTHONPATH": baseline_checkout(bed, args.baseline)} if args.baseline else None
            found = bench(bed, max(args.runs, 1), baseline, env)
        if host is not None:
            print(bench_mount_host.report(host))
            print()
        print(summary(found))
        for name, samples in found.items():
            if name:
                print()
                print(report(samples, args.runs, name + " (this checkout)"))
        for name, samples in (baseline or {}).items():
            print()
            print(report(samples, args.runs, f"{name} (baseline {args.baseline})"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
