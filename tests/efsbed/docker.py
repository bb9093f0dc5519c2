"""A real Docker engine (20.10) inside the bed's kernel guest, with a tiny busybox image.

dockerd under user-mode Linux is slow (ready in ~5-6 s, `docker run` ~8-10 s), so a test
module starts one engine and shares it. The data root lives on the guest's tmpfs
(/var/tmp), the storage driver is vfs (no overlay-on-hostfs), and the engine has no
bridge and no iptables rules, so it changes nothing in the guest's fail-closed routing.
Always the 20.10 CLI (/usr/bin/docker): a newer client earlier on PATH speaks a newer API.
"""

from __future__ import annotations

import io
import shutil
import signal
import tarfile
import time
from pathlib import Path
from typing import Optional, Sequence

from efsbed.guest import Guest, GuestCommandError, GuestResult

DOCKER = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
DATA_ROOT = "/var/tmp/docker"
LOG = "/var/log/bed/dockerd.log"
IMAGE = "efsbed-busybox:latest"
APPLETS = ("sh", "echo", "cat", "ls", "sleep", "mkdir", "touch", "test", "true", "rm")
SEED = "seed-from-image"  # the image's /data holds this file: a copying mount brings it along


def busybox_rootfs(path: Path) -> Path:
    """A rootfs tarball: /bin/busybox and its applets, /data with one file (for copy-up)."""
    with tarfile.open(path, "w") as tar:
        for name in ("bin", "data", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(shutil.which("busybox") or "/bin/busybox", "bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        seed = b"from the image\n"
        info = tarfile.TarInfo(f"data/{SEED}")
        info.size, info.mode = len(seed), 0o644
        tar.addfile(info, io.BytesIO(seed))
    return path


class GuestDocker:
    def __init__(self, guest: Guest, workdir: Path) -> None:
        self.guest = guest
        self.workdir = Path(workdir)  # a host directory the guest sees at the same path
        self.pid: Optional[int] = None

    def docker(self, *args: str, timeout: float = 120, check: bool = False) -> GuestResult:
        return self.guest.run([DOCKER, *args], timeout=timeout, check=check)

    def start(self, timeout: float = 90) -> "GuestDocker":
        self.guest.run(["mkdir", "-p", DATA_ROOT, "/etc/docker", "/run/docker/plugins"], check=True)
        self.pid = self.guest.spawn([
            DOCKERD, "--data-root", DATA_ROOT, "--storage-driver=vfs", "--iptables=false",
            "--ip-forward=false", "--ip-masq=false", "--bridge=none",
            "--exec-opt", "native.cgroupdriver=cgroupfs", "--pidfile", "/run/efsbed-dockerd.pid",
        ], log=LOG)
        deadline = time.monotonic() + timeout
        while self.docker("version", "--format", "{{.Server.Version}}", timeout=30).rc != 0:
            if not self.guest.kill(self.pid, 0):
                raise RuntimeError(f"dockerd exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dockerd not ready within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)  # polling the engine with a deadline
        tarball = busybox_rootfs(self.workdir / "busybox-rootfs.tar")
        self.docker("import", str(tarball), IMAGE, check=True)
        return self

    def __enter__(self) -> "GuestDocker":
        try:
            return self.start()
        except BaseException:
            self.stop()  # what a start cut short left: the engine, its data root
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return self.guest.run(["tail", f"-n{lines}", LOG]).stdout

    def run_detached(self, name: str, args: Sequence[str], command: Sequence[str]) -> str:
        res = self.docker("run", "-d", "--name", name, *args, IMAGE, *command, check=True)
        return res.stdout.strip()

    def stop(self) -> None:
        """Remove every container, stop the engine (and its containerd), free the data root."""
        if self.pid is None:
            return
        try:
            ids = self.docker("ps", "-aq", timeout=60).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, timeout=120)
        except GuestCommandError:
            pass  # the engine is stopped below either way
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            self.guest.kill(self.pid, sig)
            deadline = time.monotonic() + wait
            while self.guest.kill(self.pid, 0) and time.monotonic() < deadline:
                time.sleep(0.2)  # waiting for the engine's group to exit, bounded
            if not self.guest.kill(self.pid, 0):
                break
        # containerd and its shims may run in sessions of their own; the guest runs no other
        # engine, so whatever is left of these names is this engine's, ended by pid.
        left = self.guest.run(["pgrep", "-x", "dockerd|containerd|containerd-shim-runc-v2"]).stdout.split()
        for pid in left:
            self.guest.run(["kill", "-9", pid])
        self.guest.run(["rm", "-rf", DATA_ROOT, "/run/docker", "/run/containerd", "/run/efsbed-dockerd.pid"])
        self.pid = None
        if left:
            raise RuntimeError(f"engine processes outlived dockerd and were killed: {left}")
