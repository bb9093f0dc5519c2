"""The host's own checks: privileges, config, stunnel, nfs-utils, kernel NFS, state dir, ports."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Callable, List, Optional

from efsplug import ports, state
from efsplug.config import Config, load_config
from efsplug.doctor.checks import Check, Problem

MOUNT_NFS4 = ("/sbin/mount.nfs4", "/usr/sbin/mount.nfs4", "/sbin/mount.nfs", "/usr/sbin/mount.nfs")
STUNNEL_MIN = (5, 15)  # checkHost (stunnel_check_cert_hostname) came with 5.15
MIN_FREE_BYTES = 1 << 20


class HostChecks:
    """Checks in order; the config found is kept for the checks that follow (and target.py)."""

    def __init__(self, config_path: Optional[Path] = None) -> None:
        self.config_path = config_path
        self.config: Config = Config()

    def checks(self) -> List[Check]:
        return [
            Check("root", "running as root", self.root),
            Check("config", "efs-utils.conf", self.load_config),
            Check("stunnel", "stunnel installed and recent enough", self.stunnel, needs=("config",)),
            Check("nfs-utils", "mount.nfs4 installed", self.nfs_utils),
            Check("kernel-nfs", "the kernel's NFSv4 client", self.kernel_nfs),
            Check("state-dir", "efsplug's state directory", self.state_dir, needs=("root", "config")),
            Check("ports", "a free port in the tunnel port range", self.ports, needs=("state-dir",)),
        ]

    def root(self) -> str:
        if os.geteuid() != 0:
            raise Problem("doctor runs as uid %d, and mounting needs root" % os.geteuid(), "run it with sudo")
        return "uid 0"

    def load_config(self) -> str:
        loaded = load_config(self.config_path)  # ConfigError: the file, the line and the fix
        self.config = loaded.config
        if loaded.warnings:
            return f"{len(loaded.warnings)} warning(s): {loaded.warnings[0]}"
        return "read"

    def stunnel(self) -> str:
        from efsplug.mounttunnel import stunnel_binary

        binary = stunnel_binary(self.config)
        version = stunnel_version(binary)
        if version is None:
            raise Problem(f"{binary} -version did not say its version", "reinstall stunnel (stunnel5 on Amazon Linux)")
        if version < STUNNEL_MIN:
            raise Problem(f"{binary} is stunnel {version[0]}.{version[1]}; hostname checks need 5.15 or later",
                          "install stunnel5 (Amazon Linux) or a newer stunnel4 package")
        return f"{binary}, version {version[0]}.{version[1]}"

    def nfs_utils(self) -> str:
        found = next((p for p in MOUNT_NFS4 if os.access(p, os.X_OK)), None)
        if found is None:
            raise Problem("mount.nfs4 is not installed", "install nfs-utils (Amazon Linux) or nfs-common (Debian)")
        return found

    def kernel_nfs(self) -> str:
        if _has_filesystem("nfs4"):
            return "nfs4 in /proc/filesystems"
        release = os.uname().release
        modules = Path("/lib/modules") / release
        if any(modules.glob("kernel/fs/nfs/nfsv4.ko*")):
            return "the nfsv4 module is installed (loaded at the first mount)"
        raise Problem(f"kernel {release} has no NFSv4 client (neither built in nor as a module)",
                      "install the kernel's modules package (kernel-modules-extra) or boot a kernel with NFSv4")

    def state_dir(self) -> str:
        path = Path(self.config.efsplug.state_dir)
        if not os.path.lexists(path):
            if not path.parent.is_dir():
                raise Problem(f"{path} does not exist and neither does its parent", f"create {path.parent}")
            return f"{path} will be created at the first mount"
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise Problem(f"{path} is not a directory", f"move it away; efsplug creates {path} itself")
        if info.st_uid != 0 or info.st_mode & 0o022:
            raise Problem(f"{path} is owned by uid {info.st_uid} with mode {oct(info.st_mode & 0o777)}: others could "
                          "plant tunnel configs there", f"chown root:root {path} && chmod 0750 {path}")
        fs = os.statvfs(path)
        if fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES or fs.f_favail == 0:
            raise Problem(f"the file system of {path} is full", "free space there (it is /run, a tmpfs, by default)")
        _records, problems = state.load_all(path)
        if problems:
            raise Problem(f"{len(problems)} unreadable state record(s) in {path}, e.g. {problems[0].path.name}",
                          "see `efsplug status`; the supervisor quarantines them")
        return f"{path}, {len(_records)} mount record(s)"

    def ports(self) -> str:
        mount = self.config.mount
        lower, upper = mount.port_range_lower_bound, mount.port_range_upper_bound
        try:
            reservation = ports.reserve_port(Path(self.config.efsplug.state_dir) / "ports", lower, upper)
        except ports.PortRangeExhausted as exc:
            raise Problem(str(exc).split(";")[0], str(exc).split("; ", 1)[1]) from None
        reservation.release()
        return f"range {lower}-{upper - 1}, e.g. {reservation.port} is free"


def stunnel_version(binary: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
    """(major, minor) from `stunnel -version` (printed on stderr), None if it says none."""
    try:
        done = run([binary, "-version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Problem(f"{binary} -version failed ({exc})", "reinstall stunnel") from None
    return parse_stunnel_version(done.stdout + done.stderr)


def parse_stunnel_version(text: str):
    match = re.search(r"stunnel (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _has_filesystem(name: str) -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == [name] for line in f)
    except OSError:
        return False
