"""Taking an EFS mount down: the kernel mount, then its tunnel, files and state record.

Shared by the Docker plugin (Unmount/Remove), the supervisor (reaping) and operators.
The order matters: the tunnel goes only after the kernel no longer needs it. The kernel
shares one NFS client between mounts of the same server, so a tunnel may carry another
mount's traffic (its `port=` shows on that mount): such a tunnel is never stopped, and
its record stays, so the supervisor keeps it alive and reaps it once no mount uses it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, List, Optional

from efsplug import ports, sharing, state, tunnelhost
from efsplug.errors import EfsplugError, shown
from efsplug.mounttable import KernelMount, by_mountpoint, ports_in_use, read_mounts
from efsplug.state import MountRecord
from efsplug.supervisor.orphans import release_unrecorded
from efsplug.tunnel import Tunnel, TunnelError


def kernel_connected(pid: int, port: int) -> bool:
    """True if a socket in pid's network namespace is connected to 127.0.0.1:port.

    The NFS client's sockets belong to no process; they show here as connections whose
    remote end is the tunnel's port (stunnel's own accepted sockets have it as local).
    """
    want = f"0100007F:{port:04X}"
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 3 and cols[2] == want and cols[3] in ("01", "02"):  # ESTABLISHED, SYN_SENT
                    return True
    except OSError:
        return False
    return False


# After umount returns, the NFS client closes its connection to the tunnel a moment later
# (30-90 ms seen in the bed, both kernels). Stopping the tunnel then is safe; judging a
# moment too early left the tunnel to the supervisor's reaper instead.
TEARDOWN_WAIT = 3.0


def kernel_disconnects(pid: int, port: int, timeout: float) -> bool:
    """Wait, bounded by timeout, until the kernel has no connection to the tunnel; True if so."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while kernel_connected(pid, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)  # back-off while polling /proc: the kernel gives no event for this
        delay = min(delay * 2, 0.1)
    return True


UMOUNT = "/bin/umount"
_NOT_MOUNTED = ("not mounted", "no mount point specified", "mountpoint not found")


class UnmountError(EfsplugError):
    """The mount could not be taken down; the message says why and what to do."""


def same_path(a: str, b: str) -> bool:
    # normpath only: realpath would stat the mount point, which hangs on a dead server.
    return os.path.normpath(a) == os.path.normpath(b)


def records_for(state_dir: Path, mountpoint: str) -> List[MountRecord]:
    records, _problems = state.load_all(state_dir)
    return [r for r in records if same_path(r.mountpoint, mountpoint)]


def is_mounted(mountpoint: str, mounts: Optional[Iterable[KernelMount]] = None) -> bool:
    table = by_mountpoint(read_mounts() if mounts is None else mounts)
    return os.path.normpath(mountpoint) in table


def unmount_efs(mountpoint: str, *, state_dir: Path, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount mountpoint (if mounted) and release every record made for it.

    A plain umount hangs once the task's network namespace is gone (the server can never
    answer), so one that does not finish within timeout is retried lazily.
    """
    if is_mounted(mountpoint):
        umount(mountpoint, lazy=lazy, timeout=timeout)
    for record in records_for(Path(state_dir), mountpoint):
        release(record, state_dir=Path(state_dir), teardown_wait=TEARDOWN_WAIT)


def release_leftovers(mountpoint: str, *, state_dir: Path) -> List[str]:
    """With nothing mounted at mountpoint, release what an interrupted mount or unmount of it
    left: its records (tunnels, files) and per-mount directories no record names yet (with
    the tunnel running from one). Never unmounts; a tunnel the kernel still uses stays.

    Only for a caller that knows no mount of mountpoint is in progress (the agent at start,
    or under the volume's lock). Returns what was released, for the log.
    """
    state_dir = Path(state_dir)
    if any(m.is_nfs and same_path(m.mountpoint, mountpoint) for m in read_mounts()):
        return []
    released = []
    for record in records_for(state_dir, mountpoint):
        if release(record, state_dir=state_dir):
            released.append(f"record {state.file_name(record)}")
    try:
        dirs = release_unrecorded(state_dir, mountpoint, read_mounts())
    except TunnelError as exc:
        raise UnmountError(f"cannot stop a tunnel left for {shown(mountpoint)}: {exc}") from None
    return released + [f"directory {name} (no record)" for name in dirs]


def umount(mountpoint: str, *, lazy: bool = False, timeout: float = 30.0) -> None:
    """umount(8) without its helpers (-i): umount.nfs4 would talk to the server first."""
    if not lazy:
        try:
            _run([UMOUNT, "-i", mountpoint], timeout)
            return
        except subprocess.TimeoutExpired:
            pass  # the server does not answer: detach instead (the hung umount was killed)
    try:
        _run([UMOUNT, "-i", "-l", mountpoint], timeout)
    except subprocess.TimeoutExpired:
        raise UnmountError(f"umount -l {shown(mountpoint)} did not finish within {timeout:g}s; see dmesg") from None


def _run(argv: List[str], timeout: float) -> None:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UnmountError(f"{argv[0]} not found; install util-linux") from None
    if done.returncode == 0:
        return
    text = done.stderr.strip()
    if any(phrase in text.lower() for phrase in _NOT_MOUNTED):
        return  # someone else unmounted it first: the goal is reached
    last = text.splitlines()[-1] if text else f"exit status {done.returncode}"
    hint = "; files are open there: stop their users or unmount lazily" if "busy" in text.lower() else ""
    raise UnmountError(f"cannot unmount {shown(argv[-1])}: {last}{hint}")


def tunnel_in_use(record: MountRecord, mounts: Iterable[KernelMount]) -> List[str]:
    """Mount points whose traffic flows through record's tunnel (empty: nobody's)."""
    if record.port is None:
        return []
    return ports_in_use(mounts).get(record.port, [])


# How long a release waits for a tunnel's port lock: a mount joining the tunnel holds it
# for milliseconds, a start on that port until the new tunnel listens.
HOLD_TIMEOUT = 2.0


def release(record: MountRecord, *, state_dir: Path, mounts: Optional[List[KernelMount]] = None,
            teardown_wait: float = 0.0, failed_mount: bool = False) -> bool:
    """Remove record and its own directory; stop its tunnel (and remove the tunnel's files)
    unless another record shares the tunnel or a mount still needs it.

    Returns True if the record is gone, False if it was kept because a kernel mount still
    uses the record's mount point or its tunnel; then the supervisor owns it and reaps it
    when the last user goes. teardown_wait: right after an umount, how long the kernel may
    take to close its connection before the tunnel counts as still in use. failed_mount:
    the undo of a mount that was never made (nothing of the kernel's to wait for).

    The tunnel's port lock is held while the other records are looked at and the tunnel is
    stopped, so a mount joining the tunnel (efsplug.sharing.join) is either seen or waits.
    """
    state_dir = Path(state_dir)
    table = read_mounts() if mounts is None else mounts
    if not failed_mount and any(m.is_nfs and same_path(m.mountpoint, record.mountpoint) for m in table):
        return False
    hold = None
    if record.port is not None and record.tunnel is not None:
        hold = ports.hold_port(state_dir / "ports", record.port, HOLD_TIMEOUT)
        if hold is None:
            return False  # being joined or restarted this very moment: looked at again later
    with hold or contextlib.nullcontext():
        if sharing.siblings(record, state.load_all(state_dir)[0]):
            _remove_own(record, state_dir)
            return True
        if not failed_mount and tunnel_in_use(record, table):
            return False
        if record.tunnel is not None:
            tunnel = Tunnel.from_identity(record.tunnel)  # None if gone or the pid was reused
            if tunnel is not None and record.port is not None and not failed_mount \
                    and not kernel_disconnects(tunnel.pid, record.port, teardown_wait):
                return False  # the NFS client still tears its session down through it
            try:
                _stop_tunnel(record, tunnel, state_dir)
            except TunnelError as exc:
                raise UnmountError(f"cannot stop the tunnel of {shown(record.mountpoint)}: {exc}") from None
        remove_files(record, state_dir)
        state.remove(state_dir, record)
    return True


def _stop_tunnel(record: MountRecord, tunnel: Optional[Tunnel], state_dir: Path) -> None:
    """Stop the tunnel's process, or take its section out of a shared one (which stops
    with its last section)."""
    if record.host_config is None:
        if tunnel is not None:
            tunnel.stop()
        return
    host = tunnelhost.host_of_config(state_dir, record.host_config)
    if host is None:
        raise TunnelError(f"its shared stunnel config {record.host_config} is not under {state_dir}")
    if record.port is not None:
        tunnelhost.remove(host, record.port)


def _remove_own(record: MountRecord, state_dir: Path) -> None:
    """Another record shares the tunnel: only this mount's record and directory go; the
    tunnel's directory (its config and certificate) stays while anyone uses it."""
    own = mount_dir(record, state_dir)
    if os.path.realpath(own) != os.path.realpath(tunnel_dir(record, state_dir)):
        _remove_inside(str(own), os.path.realpath(state_dir))
    state.remove(state_dir, record)


def mount_dir(record: MountRecord, state_dir: Path) -> Path:
    """The per-mount directory (stunnel.conf, certificate.pem), named like the record."""
    return Path(state_dir) / state.file_name(record)[: -len(state.SUFFIX)]


def tunnel_dir(record: MountRecord, state_dir: Path) -> Path:
    """The directory of the tunnel the record's mount goes through (its config, certificate
    and log): the record's own per-mount directory, or that of the mount it joined."""
    if record.config_file:
        return Path(record.config_file).parent
    return mount_dir(record, state_dir)


def remove_files(record: MountRecord, state_dir: Path) -> None:
    """Delete the record's own files and its tunnel's; only paths inside state_dir are ever touched."""
    root = os.path.realpath(state_dir)
    candidates = [str(mount_dir(record, state_dir)), *record.files_created]
    if record.config_file:
        candidates += [record.config_file, str(tunnel_dir(record, state_dir))]
    for path in candidates:
        _remove_inside(path, root)


def _remove_inside(path: str, root: str) -> None:
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root or real == root:
        return  # a record naming files outside the state dir is not trusted with them
    if os.path.isdir(real) and not os.path.islink(path):
        shutil.rmtree(real, ignore_errors=True)
    else:
        try:
            os.unlink(real)
        except FileNotFoundError:
            pass
