"""Start-up reconciliation: the kernel's mount table corrects the records; nothing is unmounted."""

from __future__ import annotations

from pathlib import Path

from efsplug.agent.reconcile import reconcile
from efsplug.agent.volumes import Volume
from efsplug.mounttable import parse_mountinfo

ROOT = Path("/var/lib/ecs/volumes")
A = "a" * 64


def vol(name: str, mounted: bool, refs=()) -> Volume:
    return Volume(name, "fs-12345678", "tls", str(ROOT / name), "T", mounted=mounted, refs=tuple(refs))


def mountinfo(*points: str, fstype: str = "nfs4") -> list:
    lines = [f"{40 + i} 1 0:{50 + i} / {p} rw,relatime - {fstype} 127.0.0.1:/ rw,vers=4.1,port=2005{i}"
             for i, p in enumerate(points)]
    lines.append("22 1 0:21 / /proc rw - proc proc rw")
    return parse_mountinfo("\n".join(lines) + "\n")


def test_agreeing_state_is_unchanged() -> None:
    volumes = {"up": vol("up", True, [(A, 1)]), "down": vol("down", False)}
    result = reconcile(volumes, mountinfo(str(ROOT / "up")), ROOT)
    assert result.volumes == volumes and not result.changed and result.notes == []


def test_vanished_mount_is_marked_unmounted_and_its_stale_ids_dropped() -> None:
    result = reconcile({"v": vol("v", True, [(A, 2)])}, mountinfo(), ROOT)
    assert result.changed and result.volumes["v"] == vol("v", False)
    assert result.notes == ["volume v: its mount is gone (reboot or umount); the next Mount mounts it again"]


def test_unrecorded_mount_of_a_known_volume_is_adopted() -> None:
    result = reconcile({"v": vol("v", False)}, mountinfo(str(ROOT / "v")), ROOT)
    assert result.changed and result.volumes["v"].mounted
    assert "adopted" in result.notes[0]


def test_unknown_mounts_under_the_root_are_reported_and_others_ignored() -> None:
    mounts = mountinfo(str(ROOT / "stranger"), "/mnt/efs", str(ROOT / "bind"))
    mounts += parse_mountinfo(f"90 1 0:90 / {ROOT}/tmpfs rw - tmpfs tmpfs rw\n")
    result = reconcile({}, mounts, ROOT)
    assert not result.changed and result.volumes == {}
    assert result.notes == [
        f"unknown NFS mount {ROOT}/bind under the volumes root: left alone",
        f"unknown NFS mount {ROOT}/stranger under the volumes root: left alone",
    ]


def test_non_nfs_mount_at_a_volume_path_does_not_count() -> None:
    mounts = parse_mountinfo(f"90 1 0:90 / {ROOT}/v rw - tmpfs tmpfs rw\n")
    assert reconcile({"v": vol("v", True)}, mounts, ROOT).volumes["v"].mounted is False


def test_another_types_volume_counts_any_mount_at_its_own_mountpoint() -> None:
    # A type=nfs4 (or s3files) volume: its helper picks the file system type; S3 Files shows as
    # nfs4 from 127.0.0.1 today, something else tomorrow. Its mountpoint is the volume's own.
    other = Volume("o", "203.0.113.49:/", "", str(ROOT / "o"), "T", fs_type="s3files")
    direct = parse_mountinfo(f"90 1 0:90 / {ROOT}/o rw - nfs4 203.0.113.49:/ rw,vers=4.1,addr=203.0.113.49\n")
    assert reconcile({"o": other}, direct, ROOT).volumes["o"].mounted is True
    fuse = parse_mountinfo(f"91 1 0:91 / {ROOT}/o rw - fuse.s3files s3files rw\n")
    result = reconcile({"o": other}, fuse, ROOT)
    assert result.volumes["o"].mounted is True and "adopted" in result.notes[0]
    gone = reconcile({"o": Volume("o", "203.0.113.49:/", "", str(ROOT / "o"), "T", mounted=True, fs_type="nfs")},
                     mountinfo(str(ROOT / "elsewhere")), ROOT)
    assert gone.volumes["o"].mounted is False and "its mount is gone" in gone.notes[0]
