"""mountinfo parsing: fields, escapes, NFS ports, malformed lines, shared tunnels."""

from __future__ import annotations

import pytest

from efsplug.mounttable import (
    KernelMount, MountInfoError, by_mountpoint, parse_line, parse_mountinfo, ports_in_use, read_mounts, unescape,
)

NFS = (
    "61 27 0:53 / /mnt/efs rw,relatime shared:33 - nfs4 127.0.0.1:/ "
    "rw,vers=4.1,rsize=1048576,wsize=1048576,namlen=255,hard,noresvport,proto=tcp,port=20049,"
    "timeo=600,retrans=2,sec=sys,clientaddr=127.0.0.1,local_lock=none,addr=127.0.0.1"
)
TEXT = "\n".join([
    "22 27 0:21 / /proc rw,relatime - proc proc rw",
    "26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw,mode=600,ptmxmode=000",
    NFS,
    r"62 27 0:54 /data /mnt/my\040efs\011tab rw,noatime master:1 propagate_from:2 - nfs4 127.0.0.1:/data rw,port=20050,addr=127.0.0.1",
    "63 27 0:55 / /mnt/plain rw - nfs4 192.0.2.10:/ rw,vers=4.1,port=2049,addr=192.0.2.10",
    "",
])


def test_nfs_mount_fields():
    mount = parse_line(NFS)
    assert mount == KernelMount(
        mount_id=61, mountpoint="/mnt/efs", fstype="nfs4", source="127.0.0.1:/",
        options=mount.options, port=20049,
    )
    assert mount.options.startswith("rw,relatime,rw,vers=4.1")
    assert mount.is_nfs
    assert mount.option("addr") == "127.0.0.1"
    assert mount.option("hard") == ""
    assert mount.option("nosuch") is None


def test_optional_fields_and_escapes():
    mounts = parse_mountinfo(TEXT)
    assert [m.mountpoint for m in mounts] == ["/proc", "/dev/pts", "/mnt/efs", "/mnt/my efs\ttab", "/mnt/plain"]
    assert mounts[3].source == "127.0.0.1:/data"
    assert mounts[3].port == 20050


def test_port_only_for_nfs():
    proc = parse_line("22 27 0:21 / /proc rw - proc proc rw,port=5")
    assert proc.port is None and not proc.is_nfs


def test_non_numeric_port_is_none():
    assert parse_line("1 2 0:1 / /m rw - nfs4 127.0.0.1:/ rw,port=abc").port is None


def test_unescape_backslash_newline_and_utf8():
    assert unescape(r"/a\134b") == "/a\\b"
    assert unescape(r"/a\012b") == "/a\nb"
    assert unescape(r"/caf\303\251") == "/café"
    assert unescape("/plain") == "/plain"


@pytest.mark.parametrize("line", [
    "garbage",
    "x 27 0:21 / /proc rw - proc proc rw",  # mount id not a number
    "22 27 0:21 / /proc rw proc proc rw",  # no separator
    "22 27 0:21 / /proc rw -",  # nothing after the separator
])
def test_malformed_lines_are_refused_and_skipped(line):
    with pytest.raises(MountInfoError):
        parse_line(line)
    assert parse_mountinfo(line + "\n" + NFS)[0].mountpoint == "/mnt/efs"


def test_missing_super_options():
    mount = parse_line("5 1 0:1 / /m rw - tmpfs none")
    assert mount.options == "rw" and mount.port is None


def test_ports_in_use_groups_shared_tunnels_and_ignores_remote_servers():
    shared = NFS.replace("/mnt/efs", "/mnt/second").replace("61 27", "64 27")
    used = ports_in_use(parse_mountinfo(TEXT + shared))
    assert used == {20049: ["/mnt/efs", "/mnt/second"], 20050: ["/mnt/my efs\ttab"]}


def test_by_mountpoint_keeps_the_topmost():
    over = "70 61 0:60 / /mnt/efs rw - tmpfs none rw"
    assert by_mountpoint(parse_mountinfo(NFS + "\n" + over))["/mnt/efs"].fstype == "tmpfs"


def test_read_mounts_reads_this_process_table():
    mounts = read_mounts()
    assert any(m.mountpoint == "/proc" and m.fstype == "proc" for m in mounts)


@pytest.mark.parametrize("field, path", [
    ("/mnt/with\\040spaces\\040and\\040ümlauts", "/mnt/with spaces and ümlauts"),  # escapes next to UTF-8
    ("/mnt/\\303\\274ber", "/mnt/über"),  # UTF-8 bytes written as escapes
    ("/mnt/a\\134b", "/mnt/a\\b"),
    ("/mnt/odd\\777", "/mnt/odd\\777"),  # not a byte: left as it is
])
def test_unescape_works_in_bytes(field: str, path: str) -> None:
    assert unescape(field) == path
