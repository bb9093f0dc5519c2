"""Volume types other than efs: checked options, the mount(8) argv, the helper look-up, and
the volume's status. (The real `mount -t nfs4` through Docker runs in the kernel guest.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from efsplug.agent.mounter import last_line
from efsplug.agent.othertypes import (
    MAX_VALUE, HelperMissing, TypedMount, find_helper, mount_argv, require_helper, typed_mount,
)
from efsplug.agent.volumes import new_volume, same_definition, validate_driver_opts
from efsplug.errors import EfsplugError, UsageError

ROOT = Path("/var/lib/ecs/volumes")
NFS = "203.0.113.49:/exports/a"


@pytest.mark.parametrize("fs_type", ["nfs", "nfs4", "s3files"])
def test_other_types_are_accepted_and_kept(fs_type: str) -> None:
    assert validate_driver_opts({"type": fs_type, "device": NFS, "o": "vers=4.1,port=2049"}) == (
        fs_type, NFS, "vers=4.1,port=2049")
    v = new_volume("v1", {"type": fs_type, "device": NFS}, ROOT, "T")
    assert (v.fs_type, v.device, v.options) == (fs_type, NFS, "")
    assert v.request() == TypedMount(fs_type, NFS, "", str(ROOT / "v1"))


def test_efs_stays_the_default_and_its_own_parser_applies() -> None:
    v = new_volume("v1", {"device": "fs-12345678"}, ROOT, "T")
    assert v.fs_type == "efs" and v.request().fs_id == "fs-12345678"  # type: ignore[union-attr]


def test_argv_is_mount_t_type_o_options_device_target() -> None:
    m = typed_mount("nfs4", NFS, "vers=4.1,port=2049", "/var/lib/ecs/volumes/v1")
    assert mount_argv(m) == ["/bin/mount", "-t", "nfs4", "-o", "vers=4.1,port=2049", NFS, "/var/lib/ecs/volumes/v1"]
    bare = typed_mount("s3files", "fs-0123456789abcdef0", "", "/v")
    assert mount_argv(bare, "/usr/bin/mount") == ["/usr/bin/mount", "-t", "s3files", "fs-0123456789abcdef0", "/v"]


SECRET = "awscredsuri=/v2/credentials/SECRETID"


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"type": "cifs", "device": NFS}, "volume option type='cifs' is not supported; use type=efs, nfs, nfs4 or s3files"),
        ({"type": "NFS4", "device": NFS}, "volume option type='NFS4' is not supported"),
        ({"type": "nfs4"}, "volume option 'device' is missing; add -o device=<what mount -t nfs4 mounts>, e.g. server:/path"),
        ({"type": "nfs4", "device": ""}, "volume option 'device' is missing"),
        ({"type": "nfs4", "device": "-oremount"}, "volume option device='-oremount' starts with '-', which mount "
                                                  "would read as an option; give the device itself (server:/path)"),
        ({"type": "nfs4", "device": "srv:/a\nb"}, "volume option device has a control character at position 7; remove it"),
        ({"type": "nfs4", "device": "-srv:/\0"}, "volume option device has a control character at position 7"),
        ({"type": "nfs4", "device": "srv:/\u2028"}, "volume option device has a control character at position 6"),
        ({"type": "nfs4", "device": "s" * (MAX_VALUE + 1)}, f"volume option device is {MAX_VALUE + 1} characters long, "
                                                          f"over {MAX_VALUE}; shorten it"),
        ({"type": "s3files", "device": NFS, "o": f"{SECRET}\nx"}, "volume option o has a control character at "
                                                                  f"position {len(SECRET) + 1}; remove it"),
        ({"type": "s3files", "device": NFS, "o": f"-{SECRET}"}, "volume option o starts with '-'; give "
                                                                "comma-separated mount options without it"),
        ({"type": "s3files", "device": NFS, "o": f"{SECRET},,ro"}, "volume option o has an empty item (two commas, "
                                                                   "or one at an end); remove the extra comma"),
        ({"type": "nfs", "device": NFS, "o": "ro,"}, "volume option o has an empty item"),
        ({"type": "nfs", "device": NFS, "o": "x" * (MAX_VALUE + 1)}, "volume option o is 4097 characters long"),
    ],
)
def test_each_bad_input_is_one_line_naming_the_fix(opts: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        validate_driver_opts(opts)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value) and "SECRETID" not in str(err.value) and len(str(err.value)) < 300


@given(device=st.text(max_size=40), o=st.text(max_size=40), fs_type=st.sampled_from(["nfs", "nfs4", "s3files"]))
def test_whatever_is_accepted_reaches_mount_as_plain_arguments(device: str, o: str, fs_type: str) -> None:
    try:
        m = typed_mount(fs_type, device, o, "/v")
    except UsageError as exc:
        text = str(exc)
        assert "\n" not in text and "\r" not in text and text.endswith(tuple("abcdefghijklmnopqrstuvwxyz)"))
        return
    assert mount_argv(m) == ["/bin/mount", "-t", fs_type, *(["-o", o] if o else []), device, "/v"]
    assert device and not device.startswith("-") and not o.startswith("-")
    assert len((device + "x").splitlines()) == 1 and len((o + "x").splitlines()) == 1
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in device + o)


def helper(directory: Path, name: str, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    os.chmod(path, mode)
    return path


def test_the_helper_is_looked_for_in_order_and_must_be_executable(tmp_path: Path) -> None:
    first, second = tmp_path / "sbin", tmp_path / "usr-sbin"
    dirs = [str(first), str(second)]
    assert find_helper("nfs4", dirs) is None
    helper(first, "mount.nfs4", 0o644)  # not executable: mount(8) could not run it either
    found = helper(second, "mount.nfs4")
    assert find_helper("nfs4", dirs) == found and require_helper("nfs4", dirs) == found
    assert find_helper("nfs", dirs) is None


@pytest.mark.parametrize("fs_type, fix", [
    ("s3files", "install the S3 Files mount helper (amazon-efs-utils 3.x ships it) or use type=efs"),
    ("nfs", "install nfs-utils (nfs-common on Debian)"),
])
def test_a_missing_helper_is_one_line_naming_the_package(tmp_path: Path, fs_type: str, fix: str) -> None:
    with pytest.raises(HelperMissing) as err:
        require_helper(fs_type, [str(tmp_path / "sbin"), str(tmp_path / "bin")])
    assert str(err.value) == (f"type={fs_type} needs the mount.{fs_type} helper, which is not installed (looked in "
                              f"{tmp_path}/sbin, {tmp_path}/bin); {fix}")
    assert isinstance(err.value, EfsplugError)


def test_status_of_another_type_names_type_and_device_never_options() -> None:
    v = new_volume("v1", {"type": "s3files", "device": "fs-0123456789abcdef0", "o": f"tls,iam,{SECRET}"}, ROOT, "T")
    assert v.status() == {"Type": "s3files", "Device": "fs-0123456789abcdef0", "Mounted": False, "References": 0}


def test_the_type_is_part_of_the_definition() -> None:
    a = new_volume("v1", {"type": "nfs", "device": NFS}, ROOT, "T")
    assert same_definition(a, new_volume("v1", {"type": "nfs", "device": NFS}, ROOT, "T2"))
    assert not same_definition(a, new_volume("v1", {"type": "nfs4", "device": NFS}, ROOT, "T"))


def test_a_state_file_edited_into_a_bad_device_is_refused_at_mount() -> None:
    from dataclasses import replace
    v = replace(new_volume("v1", {"type": "nfs4", "device": NFS}, ROOT, "T"), device="-x")
    with pytest.raises(UsageError, match="starts with '-'"):
        v.request()


def test_last_line_is_the_helpers_last_word_printable_and_bounded() -> None:
    assert last_line("mount.nfs4: trying\nmount.nfs4: Connection refused\n\n", 32) == "mount.nfs4: Connection refused"
    assert last_line("", 32) == "exit status 32"
    assert last_line("bad \x1b[31mred\x1b[0m", 1) == "bad ?[31mred?[0m"
    assert len(last_line("x" * 1000, 1)) == 300
