"""The shared option parser: good inputs, every rule, injection attempts, NFS option merging."""

from __future__ import annotations

from typing import List, Optional

import pytest

from efsplug.errors import EXIT_MOUNT_FAILURE, EXIT_USAGE, MountFailure, UsageError, shown
from efsplug.options import (
    MountRequest,
    nfs_device,
    nfs_mount_options,
    parse_device,
    parse_mount_args,
    parse_options,
    request_from_driver_opts,
)

FS = "fs-0123456789abcdef0"
AP = "fsap-0123456789abcdef0"
ROLE = "arn:aws:iam::123456789012:role/efs-mounter"
DEFAULTS = "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"


# --- good inputs ---------------------------------------------------------------------------

def test_mount_args_as_mount8_passes_them() -> None:
    req = parse_mount_args(
        [f"{FS}:/data/x", "/mnt/efs", "-o", "tls,iam", "-s", "-o", f"accesspoint={AP},ro", "-f", "-n", "-v"]
    )
    assert (req.fs_id, req.path, req.mountpoint) == (FS, "/data/x", "/mnt/efs")
    assert req.tls and req.iam and req.accesspoint == AP
    assert (req.fake, req.no_mtab, req.sloppy, req.verbose) == (True, True, True, True)
    assert req.nfs_options == (("ro", None),)


def test_mount_args_combined_flags_attached_o_type_and_double_dash() -> None:
    req = parse_mount_args(["-fnv", "-otls", "-t", "efs", "--", "fs-01234567", "/mnt/a"])
    assert (req.fs_id, req.path, req.tls) == ("fs-01234567", "/", True)
    assert (req.fake, req.no_mtab, req.sloppy, req.verbose) == (True, True, False, True)
    plain = parse_mount_args(["fs-01234567", "/mnt/a"])
    assert not plain.tls and plain.nfs_options == () and plain.ocsp is None


def test_every_typed_option_parses() -> None:
    o = parse_options(
        "tls,tlsport=20050,iam,awsprofile=dev.team+1@x_y-z,accesspoint=" + AP
        + ",region=us-gov-west-1,az=us-gov-west-1b,mounttargetip=10.0.1.25,netns=/proc/12/ns/net"
        + ",ocsp,verify=3,cafile=/etc/ssl/ca.pem"
    )
    assert o.tls and o.iam and o.ocsp is True
    assert (o.tlsport, o.verify) == (20050, 3)
    assert o.awsprofile == "dev.team+1@x_y-z"
    assert (o.region, o.az, o.mounttargetip) == ("us-gov-west-1", "us-gov-west-1b", "10.0.1.25")
    assert (o.netns, o.cafile, o.accesspoint) == ("/proc/12/ns/net", "/etc/ssl/ca.pem", AP)
    assert o.nfs_options == ()
    assert parse_options("noocsp").ocsp is False
    assert parse_options("tls,iam,awscredsuri=/v2/credentials/ab-12").awscredsuri == "/v2/credentials/ab-12"
    assert parse_options("crossaccount,az=us-east-1b").crossaccount


def test_web_identity_options() -> None:
    o = parse_options(f"tls,iam,rolearn={ROLE},jwtpath=/var/run/secrets/eks.amazonaws.com/serviceaccount/token")
    assert (o.rolearn, o.jwtpath) == (ROLE, "/var/run/secrets/eks.amazonaws.com/serviceaccount/token")
    gov = "arn:aws-us-gov:iam::123456789012:role/team/efs+mounter=a.b@c_d-e"
    assert parse_options(f"tls,iam,rolearn={gov},jwtpath=/t").rolearn == gov
    assert o.nfs_options == ()


@pytest.mark.parametrize("text, address", [
    ("10.0.1.25", "10.0.1.25"),
    ("2001:db8::25", "2001:db8::25"),
    ("2001:0DB8:0000:0000:0000:0000:0000:0025", "2001:db8::25"),  # canonical, lower case
    ("fd00:ec2::a", "fd00:ec2::a"),
    ("::ffff:10.0.1.25", "::ffff:a00:119"),
])
def test_mount_target_ip_v4_and_v6(text: str, address: str) -> None:
    assert parse_options(f"tls,mounttargetip={text}").mounttargetip == address


def test_efs_utils_noop_options_are_taken_and_never_reach_nfs() -> None:
    o = parse_options("tls,stunnel,nodirects3read,nos3readcache,ro")
    assert o.tls and o.nfs_options == (("ro", None),)
    plain = parse_options("notls,stunnel")
    assert not plain.tls and plain.nfs_options == ()
    # mount.nfs4 gets mountport as efs-utils hands it on Linux (NFSv4 never asks a portmapper).
    assert parse_options("mountport=2049").nfs_options == (("mountport", "2049"),)


def test_nfs_device_brackets_only_a_parsed_ipv6_address() -> None:
    assert nfs_device("fs-01234567.efs.us-east-1.amazonaws.com", "/a") == "fs-01234567.efs.us-east-1.amazonaws.com:/a"
    assert nfs_device("10.0.1.25", "/") == "10.0.1.25:/"
    assert nfs_device("2001:db8::25", "/x") == "[2001:db8::25]:/x"
    assert nfs_device(parse_options("mounttargetip=2001:DB8::25").mounttargetip or "", "/") == "[2001:db8::25]:/"


def test_ecs_driver_opts() -> None:
    req = request_from_driver_opts(
        f"{FS}:/", f"tls,tlsport=2999,iam,awscredsuri=/v2/credentials/abcd,accesspoint={AP},netns=/proc/42/ns/net"
    )
    assert req.mountpoint is None and req.path == "/"
    assert (req.tlsport, req.awscredsuri, req.netns) == (2999, "/v2/credentials/abcd", "/proc/42/ns/net")
    assert request_from_driver_opts("fs-01234567", "").tls is False


def test_last_typed_option_wins_and_fstab_only_options_dropped() -> None:
    o = parse_options("tls,tlsport=1,tlsport=2,region=us-east-1,region=eu-west-3,_netdev,nofail,noauto,"
                      "x-systemd.automount,X-mount.mkdir=0700,comment=fstab,defaults,user,,rw,")
    assert o.tlsport == 2 and o.region == "eu-west-3"
    assert o.nfs_options == (("rw", None),)


@pytest.mark.parametrize(
    "device, fs_id, path",
    [
        ("fs-01234567", "fs-01234567", "/"),
        (f"{FS}:/", FS, "/"),
        (f"{FS}:/a/b c/d:e", FS, "/a/b c/d:e"),
        (f"{FS}:/a/.../b", FS, "/a/.../b"),
    ],
)
def test_parse_device(device: str, fs_id: str, path: str) -> None:
    assert parse_device(device) == (fs_id, path)


# --- bad inputs ----------------------------------------------------------------------------

OPT_CASES = [
    # cross-option rules
    ("iam", "option 'iam' requires 'tls'; add tls to -o"),
    (f"accesspoint={AP}", "option 'accesspoint' requires 'tls'; add tls to -o"),
    ("tls,awsprofile=dev", "option 'awsprofile' requires 'iam'"),
    ("tls,awscredsuri=/v2/credentials/x", "option 'awscredsuri' requires 'iam'"),
    ("tls,iam,awsprofile=dev,awscredsuri=/v2/x", "options 'awsprofile' and 'awscredsuri' exclude each other"),
    ("tls,port=2049", "options 'port' and 'tls' exclude each other"),
    ("tls,ocsp,noocsp", "options 'ocsp' and 'noocsp' exclude each other"),
    # shape of options
    ("tls=yes", "option 'tls' takes no value"),
    ("iam=1", "option 'iam' takes no value"),
    ("crossaccount=", "option 'crossaccount' takes no value"),
    ("stunnel=yes", "option 'stunnel' takes no value; write just stunnel"),
    ("notls=1", "option 'notls' takes no value"),
    ("tls,nos3readcache=", "option 'nos3readcache' takes no value"),
    ("tlsport", "option 'tlsport' needs a value"),
    ("region=", "option 'region' needs a value"),
    # typed values
    ("tls,tlsport=0", "option 'tlsport' value '0' is invalid; use a whole number from 1 to 65535"),
    ("tls,tlsport=65536", "from 1 to 65535"),
    ("tls,tlsport=+5", "from 1 to 65535"),
    ("tls,tlsport=20 49", "from 1 to 65535"),
    ("tls,tlsport=0x50", "from 1 to 65535"),
    ("verify=4", "option 'verify' value '4' is invalid; use a whole number from 0 to 3"),
    ("verify=-1", "from 0 to 3"),
    (f"tls,accesspoint={AP.upper()}", "use fsap- followed by 17 lowercase hex digits"),
    ("tls,accesspoint=fsap-0123", "use fsap- followed by 17"),
    ("tls,accesspoint=fsap-0123456789abcdef01", "use fsap- followed by 17"),
    ("region=US-EAST-1", "use a region name like us-east-1"),
    ("region=us-east", "like us-east-1"),
    ("region=useast1", "like us-east-1"),
    ("region=us-east-1a", "like us-east-1"),
    ("az=us-east-1", "use an availability zone name like us-east-1a"),
    ("az=use1-az1", "like us-east-1a"),
    ("mounttargetip=10.0.1", "use an IPv4 address"),
    ("mounttargetip=10.0.1.256", "use an IPv4 address"),
    ("mounttargetip=010.0.1.1", "use an IPv4 address"),
    ("mounttargetip=fe80::1%eth0", "use an IPv4 address like 10.0.1.25 or an IPv6 address like 2001:db8::25 "
                                   "(no brackets, no %zone)"),
    ("mounttargetip=fe80::1%]\n[x", "contains a control"),
    ("mounttargetip=fe80::1%]x", "(no brackets, no %zone)"),
    ("mounttargetip=[2001:db8::1]", "(no brackets, no %zone)"),
    ("mounttargetip=2001:db8::1::2", "or an IPv6 address"),
    ("mounttargetip=2001:db8:::1", "or an IPv6 address"),
    ("mounttargetip=2001:db8:0:0:0:0:0:1:2049", "or an IPv6 address"),  # a port glued on
    ("mounttargetip=::1.2.3", "or an IPv6 address"),
    ("mounttargetip=example.com", "use an IPv4 address"),
    ("netns=proc/1/ns/net", "option 'netns' value 'proc/1/ns/net' is invalid; use an absolute path"),
    ("netns=/proc/../etc", "without '..'"),
    ("netns=/proc/1/ns/net;reboot", "use an absolute path"),
    ("cafile=ca.pem", "option 'cafile' value 'ca.pem' is invalid"),
    ("cafile=/etc/ssl/ca pem", "option 'cafile'"),
    ("tls,iam,awscredsuri=v2/credentials", "use an absolute path like /v2/credentials/<id>"),
    ("tls,iam,awscredsuri=//evil.example/x", "like /v2/credentials/<id>"),
    ("tls,iam,awscredsuri=/v2/../../latest/meta-data", "like /v2/credentials/<id>"),
    ("tls,iam,awscredsuri=/v2/creds?x=1", "like /v2/credentials/<id>"),
    ("tls,iam,awscredsuri=/v2/creds@169.254.169.254", "like /v2/credentials/<id>"),
    ("tls,iam,awsprofile=a b", "use a profile name of letters, digits and _.+@-"),
    ("tls,iam,awsprofile=a/b", "use a profile name"),
    # injection attempts into the tunnel config, URLs or logs
    ("tls,iam,awsprofile=a=b", "option 'awsprofile' value 'a=b' is invalid"),
    ("region=us-east-1\nfoo=bar", "mount option 'region=us-east-1\\nfoo=bar' contains a control or non-printable"),
    ("region=us-east-1]", "like us-east-1"),
    ("[section]", "mount option name '[section]' is invalid; use letters, digits, _ and -"),
    ("tls,cafile=/x\n[evil]", "contains a control or non-printable character"),
    ("tls,cafile=/x=y", "option 'cafile' value '/x=y' is invalid"),
    ("tls,cafile=/etc/[x]", "option 'cafile'"),
    ("tls,tlsport=20049\r", "contains a control"),
    ("rsize=1048576\x00", "contains a control"),
    ("soft\x1b[2J", "contains a control"),
    ("sec=sys\u2028accept=0.0.0.0:2049", "non-printable"),
    ("nconnect=\u00a016", "non-printable"),
    ("x-systemd.foo=a\nb", "contains a control"),
    ("bad.name", "mount option name 'bad.name' is invalid"),
    ("=5", "mount option name '' is invalid"),
    ("na me=1", "mount option name 'na me' is invalid"),
]


@pytest.mark.parametrize("text, message", OPT_CASES)
def test_bad_options_rejected_with_cause_and_fix(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_options(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value) and "\r" not in str(info.value)
    assert info.value.exit_code == EXIT_USAGE
    # The same rules apply on both front ends.
    with pytest.raises(UsageError) as again:
        request_from_driver_opts(FS, text)
    assert str(again.value) == str(info.value)


DEVICE_CASES = [
    ("", "device '' is not an EFS file system; use fs-<8 or 17 lowercase hex digits>[:/path]"),
    ("fs-0123456", "is not an EFS file system"),
    ("fs-012345678", "is not an EFS file system"),
    ("fs-0123456789ABCDEF0", "is not an EFS file system"),
    ("fs-0123456g", "is not an EFS file system"),
    ("fs-01234567.efs.us-east-1.amazonaws.com", "is not an EFS file system"),
    ("127.0.0.1:/", "is not an EFS file system"),
    ("fs-01234567:data", "path 'data' in device is not absolute; write fs-01234567:/<path>"),
    ("fs-01234567:", "path '' in device is not absolute"),
    ("fs-01234567:/a/../b", "contains '..'; write the path without it"),
    ("fs-01234567:/..", "contains '..'"),
    ("fs-01234567:/a,b", "contains a comma"),
    ("fs-01234567:/a\nb", "device 'fs-01234567:/a\\nb' contains a control or non-printable character"),
    ("fs-01234567:/a\tb", "contains a control"),
]


@pytest.mark.parametrize("device, message", DEVICE_CASES)
def test_bad_devices_rejected(device: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_device(device)
    assert message in str(info.value)
    with pytest.raises(UsageError, match="device|path"):
        request_from_driver_opts(device or "x", "")


ARGV_CASES = [
    ([], "expected a device and a mount point, got 0 arguments; usage: mount.efs"),
    (["fs-01234567"], "got 1 arguments"),
    (["fs-01234567", "/mnt", "/extra"], "got 3 arguments"),
    (["fs-01234567", "/mnt", "-o"], "argument -o needs a value"),
    (["fs-01234567", "/mnt", "-t"], "argument -t needs a value"),
    (["fs-01234567", "/mnt", "-x"], "unknown argument '-x'; usage:"),
    (["fs-01234567", "/mnt", "-N", "/proc/1/ns/mnt"], "unknown argument '-N'"),
    (["fs-01234567", "/mnt", "--bind"], "unknown argument '--bind'"),
    (["fs-01234567", "mnt"], "mount point 'mnt' is not absolute; give the full path"),
    (["fs-01234567", "/mnt\n/x"], "mount point '/mnt\\n/x' contains a control"),
    (["fs-01234567", "/mnt", "-o", "iam"], "option 'iam' requires 'tls'"),
    (["fs-01234567", "/mnt", "-o", "tls", "-o", "port=2049"], "options 'port' and 'tls' exclude each other"),
    (["bogus", "/mnt"], "device 'bogus' is not an EFS file system"),
]


@pytest.mark.parametrize("argv, message", ARGV_CASES)
def test_bad_mount_args(argv: List[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_mount_args(argv)
    assert message in str(info.value)


def test_driver_opts_without_device() -> None:
    with pytest.raises(UsageError, match="volume option 'device' is missing; add -o device="):
        request_from_driver_opts("", "tls")


def test_request_refuses_a_bad_fs_id_even_when_built_directly() -> None:
    with pytest.raises(UsageError, match="file system id 'nope' is invalid"):
        MountRequest(fs_id="nope")


# --- NFS options ---------------------------------------------------------------------------

def _nfs(opts: str, port: Optional[int] = None) -> str:
    return nfs_mount_options(parse_options(opts), tunnel_port=port)


@pytest.mark.parametrize(
    "opts, port, expected",
    [
        ("", None, DEFAULTS),
        ("tls", 20049, DEFAULTS + ",port=20049"),
        (f"tls,iam,accesspoint={AP},region=us-east-1,awsprofile=p,az=us-east-1a,ocsp,verify=1,"
         f"cafile=/c,netns=/n,tlsport=3,mounttargetip=10.1.1.1,stunnel", 20100, DEFAULTS + ",port=20100"),
        ("soft", None, "nfsvers=4.1,rsize=1048576,wsize=1048576,timeo=600,retrans=2,noresvport,soft"),
        ("hard", None, "nfsvers=4.1,rsize=1048576,wsize=1048576,timeo=600,retrans=2,noresvport,hard"),
        ("rsize=65536,timeo=100", None, "nfsvers=4.1,wsize=1048576,hard,retrans=2,noresvport,rsize=65536,timeo=100"),
        ("vers=4.0", None, "rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,vers=4.0"),
        ("nfsvers=4.2", None, "rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,nfsvers=4.2"),
        ("minorversion=0", None, "nfsvers=4,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,minorversion=0"),
        ("vers=4,minorversion=1", None, "rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,vers=4,minorversion=1"),
        ("resvport,ro", None, "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,resvport,ro"),
        ("port=2049", None, DEFAULTS + ",port=2049"),
        ("context=system_u:object_r:nfs_t:s0", None, DEFAULTS + ",context=system_u:object_r:nfs_t:s0"),
    ],
)
def test_nfs_mount_options(opts: str, port: Optional[int], expected: str) -> None:
    assert _nfs(opts, port) == expected


def test_access_point_and_efs_options_never_reach_nfs() -> None:
    req = request_from_driver_opts(FS, f"tls,iam,accesspoint={AP},awscredsuri=/v2/credentials/z,netns=/proc/1/ns/net")
    out = nfs_mount_options(req, tunnel_port=20049)
    for word in ("fsap", "accesspoint", "iam", "tls", "awscredsuri", "netns"):
        assert word not in out


def test_tunnel_port_must_match_tls() -> None:
    with pytest.raises(ValueError, match="exactly when"):
        _nfs("tls", None)
    with pytest.raises(ValueError, match="exactly when"):
        _nfs("", 20049)


# --- errors --------------------------------------------------------------------------------

def test_error_classes_and_one_line_messages() -> None:
    assert MountFailure("x").exit_code == EXIT_MOUNT_FAILURE == 32
    assert str(UsageError("a\nb\r\nc")) == "a b  c"


@pytest.mark.parametrize(
    "value, text",
    [
        ("plain", "'plain'"),
        ("a\nb", "'a\\nb'"),
        ("q'uote\\", "'q\\'uote\\\\'"),
        ("\x1b[31m", "'\\x1b[31m'"),
        ("x" * 100, "'" + "x" * 77 + "...'"),
    ],
)
def test_shown_escapes_and_bounds(value: str, text: str) -> None:
    assert shown(value) == text
