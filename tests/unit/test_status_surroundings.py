"""`efsplug status`: which mounts share a tunnel or a stunnel process, read from one index."""

from __future__ import annotations

from efsplug.mounttable import KernelMount
from efsplug.state import MountRecord
from efsplug.status import Surroundings

FS = "fs-0123456789abcdef0"


def record(mountpoint: str, port: int, config: str, host: str = None) -> MountRecord:
    return MountRecord(fs_id=FS, mountpoint=mountpoint, port=port, config_file=config, host_config=host, tls=True,
                       version=2)


def nfs(mountpoint: str, port: int) -> KernelMount:
    return KernelMount(1, mountpoint, "nfs4", "127.0.0.1:/", f"rw,vers=4.1,port={port},addr=127.0.0.1", port)


A = record("/mnt/a", 20049, "/run/efs/a/stunnel.conf", host="/run/efs/host-1.conf")
B = record("/mnt/b", 20049, "/run/efs/a/stunnel.conf", host="/run/efs/host-1.conf")  # joined a's tunnel
C = record("/mnt/c", 20050, "/run/efs/c/stunnel.conf", host="/run/efs/host-1.conf")  # another section, same process
D = record("/mnt/d", 20051, "/run/efs/d/stunnel.conf")  # a process of its own
PLAIN = MountRecord(fs_id=FS, mountpoint="/mnt/plain")  # no TLS: no tunnel at all


def test_tunnel_and_process_sharing_are_named_and_a_mount_never_shares_with_itself() -> None:
    around = Surroundings.of([A, B, C, D, PLAIN], [nfs("/mnt/a", 20049), nfs("/mnt/b/", 20049)])
    assert around.shares_tunnel_with(A) == ("/mnt/b",)
    assert around.shares_tunnel_with(B) == ("/mnt/a",)
    assert around.shares_tunnel_with(C) == () and around.shares_tunnel_with(D) == ()
    assert around.shares_process_with(A) == ("/mnt/c",)  # b is the same tunnel, named above instead
    assert around.shares_process_with(C) == ("/mnt/a", "/mnt/b")
    assert around.shares_process_with(D) == () and around.shares_tunnel_with(PLAIN) == ()


def test_mounted_and_port_users_come_from_the_nfs_mounts_only() -> None:
    table = [nfs("/mnt/a/", 20049), nfs("/mnt/b", 20049),
             KernelMount(2, "/mnt/ext", "ext4", "/dev/sda1", "rw", None)]
    around = Surroundings.of([A, B], table)
    assert around.mounted == frozenset({"/mnt/a", "/mnt/b"})
    assert around.port_users == {20049: ["/mnt/a/", "/mnt/b"]}
