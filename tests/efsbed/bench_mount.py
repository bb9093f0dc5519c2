"""`scripts/bench mount`: how long `mount -t efs` takes in the kernel guest, and where it goes.

Starts its own Bed, then in the guest runs `mount -t efs -v <fs> <dir> -o
tls,iam,accesspoint=<ap>` (instance role credentials) N times, each from the same starting
point (no tunnel, no state; the private key, created once per host, is kept, as on a real
host). Times are taken inside the guest (date +%s%N around the command), so the command
channel is not counted; the phase breakdown is what `mount.efs -v` prints. For
comparison it times a bare mount.nfs4 through an already running tunnel and a bare
Python start: the floor the helper cannot go below under user-mode Linux.

`--baseline <git rev>` also times that revision's efsplug (extracted with git archive,
put first on PYTHONPATH), alternating run by run, so a before/after comparison sees the
same machine load: the bed shares its two cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from efsbed.bed import Bed, REPO
from efsbed.guest import GuestResult

MOUNTPOINT = "/mnt/bench"
STATE_DIR = "/run/efs"
PYTHON = str(REPO / ".venv" / "bin" / "python")
PHASES = ("resolve", "credentials", "port", "certificate", "tunnel", "mount.nfs4")
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


def baseline_checkout(bed: Bed, rev: str) -> str:
    """rev's efsplug package under the bed's workdir (visible in the guest); the PYTHONPATH for it."""
    target = bed.workdir / "baseline"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "efsplug"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
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


def bench(bed: Bed, runs: int, baseline: Optional[Samples] = None, baseline_env: Optional[Dict[str, str]] = None
          ) -> Samples:
    samples = Samples()
    ap = bed.access_points[0].id
    command = ["mount", "-t", "efs", "-v", bed.fs_id, MOUNTPOINT, "-o", f"tls,iam,accesspoint={ap}"]
    bed.run(["mkdir", "-p", MOUNTPOINT], timeout=30)
    for i in range(runs + 1):  # run 0 warms caches and creates the private key: not counted
        if baseline is not None:
            measure(bed, baseline, command, baseline_env, counted=bool(i))
            undo_mount(bed)
        measure(bed, samples, command, None, counted=bool(i))
        undo_mount(bed, keep_tunnel=(i == runs))
    (record,) = state_records(bed)
    nfs = ["/sbin/mount.nfs4", "127.0.0.1:/", MOUNTPOINT, "-o", f"{NFS_OPTIONS},port={record['port']}"]
    for _ in range(runs):
        samples.add("bare mount.nfs4", elapsed_ms(timed(bed, nfs)))
        bed.run(["umount", MOUNTPOINT], timeout=60)
    bed.run(["kill", str(record["tunnel"]["pid"])])
    bed.run(["rm", "-rf", STATE_DIR])
    for _ in range(runs):
        samples.add("python start", elapsed_ms(timed(bed, [PYTHON, "-c", "pass"])))
    return samples


def report(samples: Samples, runs: int, title: str = "") -> str:
    lines = [
        f"mount -t efs -o tls,iam,accesspoint (instance role), {runs} runs, milliseconds{title}",
        f"{'':40} {'median':>9} {'min':>9} {'max':>9} {'n':>4}",
    ]
    rows = [(f"  phase {name}", name) for name in PHASES]
    rows += [
        ("total: command start to mounted", "total"),
        ("helper overhead (total - its mount.nfs4)", "overhead"),
        ("bare mount.nfs4 via a running tunnel", "bare mount.nfs4"),
        ("bare python start (venv, -c pass)", "python start"),
        ("first run (creates the private key)", "first run (creates key)"),
    ]
    for label, name in rows:
        row = samples.row(name)
        if row:
            lines.append(f"{label:40} {row}")
    total = samples.values.get("total")
    bare = samples.values.get("bare mount.nfs4")
    if total and bare:
        lines.append(
            f"{'total - bare mount.nfs4 (medians)':40} {statistics.median(total) - statistics.median(bare):9.1f}"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench mount", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs (default 10, at least 10 for the report)")
    parser.add_argument("--baseline", metavar="REV", help="also time this git revision's efsplug, interleaved")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="efsbed-bench-"))
    try:
        baseline = Samples() if args.baseline else None
        with Bed(workdir / "bed") as bed:
            env = {"PYTHONPATH": baseline_checkout(bed, args.baseline)} if args.baseline else None
            samples = bench(bed, max(args.runs, 1), baseline, env)
        print(report(samples, args.runs, " (this checkout)"))
        if baseline is not None:
            print()
            print(report(baseline, args.runs, f" (baseline {args.baseline})"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
