"""`scripts/demo`: the main job against the local EFS, as a readable transcript.

Starts the bed (moto, NFS-Ganesha, the TLS endpoint, metadata services, a real Linux kernel),
mounts the file system in the kernel with `mount -t efs … -o tls,iam,accesspoint=…`, writes
a file there, reads it back from the access point's export on the host, unmounts; then the
agent under a real dockerd (an ECS task's volume, a volume with an access point of its own)
and `efsplug doctor`; and stops everything. Exit status 0 only if every step did what it says.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Sequence

from efsbed import kernel as kernels
from efsbed import procs
from efsbed.bed import Bed
from efsbed.docker import DOCKER, IMAGE, GuestDocker
from efsbed.aws import client
from efsbed.guestdaemons import EFSPLUG, GuestAgent, GuestSupervisor
from efsbed.procs import wait_until
from efsplug.agent import provisioning

DRIVER = "amazon-ecs-volume-plugin"


class Transcript:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.failures: List[str] = []
        self.cleanups: List[Callable[[], None]] = []  # run before the bed stops, newest first

    def step(self, title: str, action: Callable[[], str]) -> str:
        if self.failures:  # later steps would only describe the first failure again
            print(f"[skip]          {title}")
            return ""
        start = time.monotonic()
        try:
            detail = action()
            ok = True
        except Exception as exc:  # the transcript reports it and the demo exits non-zero
            detail, ok = f"{type(exc).__name__}: {exc}", False
            self.failures.append(title)
        mark = "ok " if ok else "FAIL"
        print(f"[{mark}] {time.monotonic() - start:6.2f}s  {title}")
        for line in detail.splitlines():
            print(f"              {line}")
        sys.stdout.flush()
        return detail

    def guest(self, bed: Bed, argv: Sequence[str], *, timeout: float = 60) -> str:
        result = bed.run(argv, timeout=timeout)
        shown = "# " + " ".join(shlex.quote(a) for a in argv)
        output = (result.stdout + result.stderr).strip()
        if result.rc != 0:
            raise RuntimeError(f"{shown} -> exit {result.rc}: {output}")
        return shown + ("\n" + output if output else "")


def main() -> int:
    t = Transcript()
    workdir = Path(tempfile.mkdtemp(prefix="efsplug-demo-"))
    bed = Bed(workdir / "bed")
    print("efsplug demo: EFS over TLS with IAM and an access point, mounted by a real Linux kernel\n")
    t.step("start the local EFS (moto, NFS-Ganesha, TLS endpoint, IMDS, ECS credentials, UML kernel)",
           lambda: _start(bed))
    if t.failures:
        return _finish(t, bed)
    ap = bed.access_points[0]
    mountpoint = "/mnt/efs"
    options = f"tls,iam,accesspoint={ap.id}"
    t.step("kernel inside the guest", lambda: t.guest(bed, ["uname", "-sr"]))
    t.guest(bed, ["mkdir", "-p", mountpoint])
    t.step("mount -t efs with tls, iam (instance role via IMDSv2) and an access point",
           lambda: t.guest(bed, ["mount", "-v", "-t", "efs", "-o", options, bed.fs_id, mountpoint]))
    t.step("the kernel's view of the mount", lambda: t.guest(bed, ["grep", mountpoint, "/proc/mounts"]))
    t.step("the endpoint verified the IAM certificate", lambda: _last_connection(bed))
    t.step("write a file in the guest", lambda: t.guest(
        bed, ["sh", "-c", f"echo 'hello from the kernel guest' > {mountpoint}/hello.txt && sync"]))
    t.step(f"read it on the host, in the access point's export ({ap.root})",
           lambda: _read_back(ap.export_dir / "hello.txt"))
    tunnel_killed_under_io(t, bed, mountpoint, ap.export_dir)
    t.step("umount", lambda: t.guest(bed, ["umount", mountpoint]))
    ecs_task(t, bed)
    return _finish(t, bed)


def provisioned_volume(t: Transcript, bed: Bed) -> None:
    """A volume with an access point of its own, made at create and deleted at rm; then doctor."""
    print("\nAn access point per volume, made by the agent through the EFS API\n")
    name = "web-data"
    t.step("docker volume create with provision=accesspoint", lambda: t.guest(bed, [
        DOCKER, "volume", "create", "-d", DRIVER, "-o", "type=efs", "-o", f"device={bed.fs_id}", "-o", "o=iam",
        "-o", "provision=accesspoint", "-o", "gidRange=50000-50999", "-o", "basePath=/volumes", name]))
    t.step("the access point EFS made for it", lambda: _made_access_point(bed, name))
    t.step("a container writes to it as root", lambda: t.guest(bed, [
        DOCKER, "run", "--rm", "--network", "none", "-v", f"{name}:/data:nocopy", IMAGE,
        "sh", "-c", "echo 'hello from a provisioned volume' > /data/hello.txt"], timeout=180))
    t.step("on the host: under its own root directory, owned by its POSIX user",
           lambda: _owned(bed.export_dir / "volumes" / name / "hello.txt"))
    t.step("docker volume rm: the access point goes, the data stays", lambda: t.guest(
        bed, [DOCKER, "volume", "rm", name]) + "\n" + _gone(bed, name))
    t.step("efsplug doctor: every check a tls,iam mount goes through, without mounting", lambda: t.guest(
        bed, [EFSPLUG, "doctor", bed.fs_id, "-o", "tls,iam"], timeout=120))


def _made_access_point(bed: Bed, volume: str) -> str:
    (ap,) = [ap for ap in _access_points(bed) if provisioning.volume_of(ap) == volume]
    user = ap["PosixUser"]
    return f"{ap['AccessPointId']}: root {ap['RootDirectory']['Path']}, uid {user['Uid']} gid {user['Gid']}"


def _access_points(bed: Bed) -> list:
    return client("efs", bed.moto.endpoint_url, bed.region).describe_access_points(
        FileSystemId=bed.fs_id)["AccessPoints"]


def _owned(path: Path) -> str:
    info = path.stat()
    if info.st_uid < 50000:
        raise RuntimeError(f"{path} is owned by uid {info.st_uid}, not the access point's user")
    return f"{path}: {path.read_text().strip()} (uid {info.st_uid}, gid {info.st_gid})"


def _gone(bed: Bed, volume: str) -> str:
    if any(provisioning.volume_of(ap) == volume for ap in _access_points(bed)):
        raise RuntimeError(f"the access point of {volume} is still there")
    return f"no access point for {volume} in EFS; the data is still under /volumes/{volume}"


def tunnel_killed_under_io(t: Transcript, bed: Bed, mountpoint: str, export_dir: Path) -> None:
    """kill -9 of the mount's stunnel while dd writes: the hard mount waits, the supervisor restarts it."""
    print("\nThe supervisor: a tunnel killed under I/O comes back\n")
    sup = GuestSupervisor(bed)
    t.cleanups.append(lambda: sup.kill(signal.SIGTERM))
    t.step("start `efsplug supervise` (poll interval 1 s)", lambda: _started(sup.start, "supervising"))
    t.step("50 MB of random data in the guest", lambda: t.guest(
        bed, ["dd", "if=/dev/urandom", "of=/tmp/demo-src", "bs=1M", "count=50", "status=none"], timeout=120))
    target = export_dir / "big.bin"
    t.step("dd it onto the mount, and kill -9 the tunnel mid-write", lambda: _kill_tunnel_under_dd(bed, mountpoint, target))
    t.step("dd completed; the host's copy has the same SHA-256", lambda: _same_file(bed, "/tmp/demo-src", target))
    t.step("what the supervisor logged", lambda: "\n".join(
        line for line in sup.log().splitlines() if "tunnel" in line))


def _kill_tunnel_under_dd(bed: Bed, mountpoint: str, target: Path) -> str:
    before = bed.run(["pgrep", "-f", "[s]tunnel.*/run/efs/"]).stdout.split()
    dd = bed.guest.spawn(["dd", "if=/tmp/demo-src", f"of={mountpoint}/big.bin", "bs=1M", "conv=fsync"], log="/tmp/demo-dd.log")
    wait_until(lambda: target.exists() and target.stat().st_size > 10 << 20, 60, "dd under way", 0.05)
    written = target.stat().st_size >> 20
    bed.run(["kill", "-9", *before], check=True)
    after = wait_until(lambda: bed.run(["pgrep", "-f", "[s]tunnel.*/run/efs/"]).stdout.split(), 30, "a new tunnel", 0.05)
    wait_until(lambda: not bed.guest.kill(dd, 0), 300, "dd to finish", 0.2)
    return f"killed tunnel pid {' '.join(before)} after {written} MB; new tunnel pid {' '.join(after)}"


def _same_file(bed: Bed, guest_path: str, host_path: Path) -> str:
    want = bed.run(["sha256sum", guest_path]).stdout.split()[0]
    got = hashlib.sha256(host_path.read_bytes()).hexdigest()
    if got != want:
        raise RuntimeError(f"checksums differ: guest {want}, host {got}")
    return f"{host_path.stat().st_size >> 20} MB, sha256 {got[:16]}…"


def ecs_task(t: Transcript, bed: Bed) -> None:
    """What an unmodified ECS agent does for a task with efsVolumeConfiguration."""
    print("\nECS: the agent as Docker volume plugin, driven by a real dockerd\n")
    docker, agent = GuestDocker(bed.guest, bed.workdir), GuestAgent(bed, env=bed.efs_api_env())
    t.cleanups += [docker.stop, agent.stop]
    t.step("start dockerd in the guest and import a busybox image", lambda: _started(docker.start, "dockerd ready"))
    t.step(f"start `efsplug agent` on /run/docker/plugins/{DRIVER}.sock", lambda: _started(agent.start, "serving"))
    ap = bed.access_points[1]
    task = "demo-task-0001"
    bed.task_credentials.grant(task)
    name = "ecs-demo-1-data-a1b2c3d4e5f6"
    driver_opts = f"o=tls,iam,awscredsuri=/v2/credentials/{task},accesspoint={ap.id}"
    t.step("docker volume create, with the driverOpts the ECS agent sends", lambda: t.guest(bed, [
        DOCKER, "volume", "create", "-d", DRIVER, "-o", "type=efs", "-o", f"device={bed.fs_id}", "-o", driver_opts, name]))
    t.step("a container writes to the volume", lambda: t.guest(bed, [
        DOCKER, "run", "--rm", "--network", "none", "-v", f"{name}:/data:nocopy", IMAGE,
        "sh", "-c", "echo 'hello from a container' > /data/container.txt"], timeout=180))
    t.step(f"read it on the host, in the access point's export ({ap.root})",
           lambda: _read_back(ap.export_dir / "container.txt", "hello from a container\n"))
    t.step("the agent's log: one line per request", lambda: "\n".join(agent.log().splitlines()[-6:]))
    t.step("docker volume rm", lambda: t.guest(bed, [DOCKER, "volume", "rm", name]))
    provisioned_volume(t, bed)


def _started(start: Callable[[], object], what: str) -> str:
    start()
    return what


def _start(bed: Bed) -> str:
    bed.start()
    return (f"kernel {kernels.summary()}\n"
            f"file system {bed.fs_id} in {bed.region}, mount target {bed.seeded.mount_target_ip} "
            f"({bed.dns_name})\naccess points: " + ", ".join(f"{ap.id} -> {ap.root}" for ap in bed.access_points))


def _last_connection(bed: Bed) -> str:
    event = bed.endpoint.connection_events()[-1]
    if event["event"] != "accepted":
        raise RuntimeError(f"last TLS connection was {event['event']}: {event['reason']}")
    return f"accepted: access key {event['access_key_id']}, access point {event['access_point']}"


def _read_back(path: Path, expected: str = "hello from the kernel guest\n") -> str:
    text = path.read_text()
    if text != expected:
        raise RuntimeError(f"{path} holds {text!r}")
    return f"{path}: {text.strip()}"


def _finish(t: Transcript, bed: Bed) -> int:
    failures, t.failures = t.failures, []  # stopping runs whatever happened before
    for cleanup in reversed(t.cleanups):
        try:
            cleanup()
        except Exception as exc:  # still stop the bed; say what did not stop cleanly
            print(f"[warn] cleanup {getattr(cleanup, '__qualname__', cleanup)}: {exc}")
    t.step("stop everything the demo started", lambda: _stop(bed))
    t.failures = failures + t.failures
    total = time.monotonic() - t.started
    if t.failures:
        print(f"\ndemo FAILED after {total:.1f}s: {', '.join(t.failures)} (logs in {bed.workdir})")
        return 1
    shutil.rmtree(bed.workdir.parent, ignore_errors=True)  # kept only when a step failed, for reading
    print(f"\ndemo passed in {total:.1f}s")
    return 0


def _stop(bed: Bed) -> str:
    bed.stop()
    left = procs.tagged_processes(bed.tag)
    if left:
        raise RuntimeError(f"still running: {[p.pid for p in left]}")
    return "no process the demo started is left"


if __name__ == "__main__":
    sys.exit(main())
