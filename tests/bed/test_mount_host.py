"""The real `mount.efs` on the host: every refused input, and failures after the tunnel started.

Each case runs the venv's `mount.efs` as a subprocess (as root, or as nobody), with
EFSPLUG_CONFIG pointing at a temp efs-utils.conf whose state_dir is a temp dir, and
checks: the exit status (1 usage/config, 32 mount failure), exactly one stderr line
holding the expected message, and nothing left behind (no record, per-mount dir, held
port lock or stunnel process).

Network safety: the host may only talk to loopback (127.0.0.0/8, ::1). Every run therefore has a region
in its config (no IMDS lookup), IMDS disabled and pointed at loopback, and passes
mounttargetip=127.0.0.1 (or ::1) whenever it gets past validation (no DNS query; the host's
resolver is a real network address).
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import psutil
import pytest

from efsbed.ca import BedCA
from efsbed.bed import MOUNT_EFS

FS = "fs-12345678"
AP = "fsap-0123456789abcdef0"
ROLE = "arn:aws:iam::123456789012:role/efs-mounter"
SAFE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> BedCA:
    return BedCA.create(tmp_path_factory.mktemp("ca"))


@dataclass
class Host:
    root: Path
    ca: BedCA

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def mnt(self) -> str:
        return str(self.root / "mnt")

    @property
    def config(self) -> Path:
        return self.root / "efs-utils.conf"

    def write_config(self, mount: Optional[Dict[str, str]] = None, efsplug: Optional[Dict[str, str]] = None,
                     tail: str = "") -> None:
        """The safe base config with mount/efsplug keys overridden or added, then tail verbatim."""
        sections = {
            "mount": {"region": "us-east-1", "stunnel_cafile": str(self.ca.cert_path), **(mount or {})},
            "efsplug": {"state_dir": str(self.state_dir), **(efsplug or {})},
        }
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                       for name, keys in sections.items())
        self.config.write_text(text + tail)

    def run(self, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
            as_nobody: bool = False) -> subprocess.CompletedProcess:
        full_env = {**SAFE_ENV, "HOME": str(self.root / "home"), "EFSPLUG_CONFIG": str(self.config), **(env or {})}
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if as_nobody else []
        return subprocess.run([*prefix, str(MOUNT_EFS), *argv], env=full_env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def host(tmp_path: Path, ca: BedCA) -> Host:
    h = Host(tmp_path, ca)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "home").mkdir()
    h.write_config()
    return h


def refused(res: subprocess.CompletedProcess, code: int, message: str) -> str:
    lines = res.stderr.splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mount.efs: ") and message in lines[0], lines[0]
    return lines[0]


def lock_is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def nothing_left(host: Host) -> None:
    """Only the shared key and the ports lock dir may stay; no lock held, no tunnel running."""
    if host.state_dir.exists():
        assert {p.name for p in host.state_dir.iterdir()} <= {"privateKey.pem", "ports", "hosts"}
        # A shared stunnel process's directory stays for the next one; it serves nothing and runs nothing.
        for shared in (host.state_dir / "hosts").glob("*"):
            assert list((shared / "services").iterdir()) == [] and not (shared / "host.json").exists()
        ports = host.state_dir / "ports"
        held = [p.name for p in ports.iterdir() if lock_is_held(p)] if ports.exists() else []
        assert held == []
    tunnels = [p.pid for p in psutil.process_iter(["cmdline"])
               if str(host.root) in " ".join(p.info["cmdline"] or [])]
    assert tunnels == []


def mount_args(host: Host, options: Optional[str], device: str = FS) -> List[str]:
    return [device, host.mnt] + (["-o", options] if options is not None else [])


# --- options, combinations, ids, paths, injection -----------------------------------------

OPTION_CASES = [
    ("iam", "option 'iam' requires 'tls'"),
    ("accesspoint=" + AP, "option 'accesspoint' requires 'tls'"),
    ("tls,awsprofile=dev", "option 'awsprofile' requires 'iam'"),
    ("tls,awscredsuri=/v2/credentials/x", "option 'awscredsuri' requires 'iam'"),
    ("tls,iam,awsprofile=dev,awscredsuri=/v2/x", "options 'awsprofile' and 'awscredsuri' exclude each other"),
    ("tls,port=2049", "options 'port' and 'tls' exclude each other"),
    ("tls,ocsp,noocsp", "options 'ocsp' and 'noocsp' exclude each other"),
    ("tls=yes", "option 'tls' takes no value"),
    ("tls,tlsport=", "option 'tlsport' needs a value"),
    ("tls,tlsport=0", "option 'tlsport' value '0' is invalid; use a whole number from 1 to 65535"),
    ("tls,tlsport=65536", "option 'tlsport' value '65536' is invalid"),
    ("tls,tlsport=2o49", "option 'tlsport' value '2o49' is invalid"),
    ("tls,verify=4", "option 'verify' value '4' is invalid; use a whole number from 0 to 3"),
    ("tls,accesspoint=fsap-123", "option 'accesspoint' value 'fsap-123' is invalid"),
    ("tls,accesspoint=FSAP-0123456789ABCDEF0", "use fsap- followed by 17 lowercase hex digits"),
    ("region=US-EAST-1", "option 'region' value 'US-EAST-1' is invalid; use a region name like us-east-1"),
    ("az=us-east-1", "option 'az' value 'us-east-1' is invalid"),
    ("tls,iam,awsprofile=a/b", "option 'awsprofile' value 'a/b' is invalid"),
    ("tls,iam,awscredsuri=v2/creds", "option 'awscredsuri' value (not shown: it is a credential) is invalid"),
    ("tls,iam,awscredsuri=//evil.example/x", "option 'awscredsuri' value (not shown: it is a credential) is invalid"),
    ("tls,iam,awscredsuri=/v2/../x", "option 'awscredsuri' value (not shown: it is a credential) is invalid"),
    ("mounttargetip=300.1.1.1", "option 'mounttargetip' value '300.1.1.1' is invalid; use an IPv4 address"),
    ("mounttargetip=mt.example.com", "option 'mounttargetip' value 'mt.example.com' is invalid"),
    ("tls,netns=proc/1/ns/net", "option 'netns' value 'proc/1/ns/net' is invalid"),
    ("tls,netns=/proc/../ns/net", "option 'netns' value '/proc/../ns/net' is invalid"),
    ("tls,cafile=ca.pem", "option 'cafile' value 'ca.pem' is invalid"),
    ("bad;name", "mount option name 'bad;name' is invalid"),
    # efs-utils 3.x options: web identity pairs, exclusions, options it refuses
    ("tls,notls", "options 'tls' and 'notls' exclude each other; keep one"),
    ("stunnel=yes", "option 'stunnel' takes no value; write just stunnel"),
    (f"tls,iam,rolearn={ROLE}", "option 'rolearn' needs 'jwtpath'; add jwtpath=<web identity token file>"),
    ("tls,iam,jwtpath=/run/token", "option 'jwtpath' needs 'rolearn'; add rolearn=<IAM role ARN>"),
    (f"tls,rolearn={ROLE},jwtpath=/run/token", "option 'rolearn' requires 'iam'; add iam (and tls) to -o"),
    (f"tls,iam,awsprofile=dev,rolearn={ROLE},jwtpath=/run/token",
     "options 'awsprofile' and 'rolearn' exclude each other; keep one"),
    ("tls,iam,rolearn=arn:aws:iam::123:role/x,jwtpath=/run/token", "option 'rolearn' value"),
    (f"tls,iam,rolearn={ROLE},jwtpath=run/token", "option 'jwtpath' value 'run/token' is invalid"),
    ("tls,capath=/etc/ssl/certs", "option 'capath' is not supported (efs-utils refuses it too); give the CA bundle "
                                  "file with cafile=<file>"),
    ("azid=use1-az1", "option 'azid' is only for S3 Files mounts"),
    (f"tls,fsap={AP}", "option 'fsap' is not an EFS option"),
    ("crossaccount,mounttargetip=127.0.0.1", "options 'mounttargetip' and 'crossaccount' exclude each other"),
    ("tls,mounttargetip=[::1]", "option 'mounttargetip' value '[::1]' is invalid; use an IPv4 address like 10.0.1.25 "
                                "or an IPv6 address like 2001:db8::25 (no brackets, no %zone)"),
    ("tls,mounttargetip=fe80::1%lo", "(no brackets, no %zone)"),
    ("tls,mounttargetip=::1:2049:x", "option 'mounttargetip' value '::1:2049:x' is invalid"),
    # Injection attempts: nothing may reach the tunnel configuration.
    ("tls,cafile=/etc/ca.pem\nexec=/bin/sh", "contains a control or non-printable character"),
    ("tls,cafile=/etc/x=y", "option 'cafile' value '/etc/x=y' is invalid"),
    ("tls,cafile=/etc/[efs]", "option 'cafile' value '/etc/[efs]' is invalid"),
    ("tls,iam,awsprofile=x]\n[efs", "contains a control or non-printable character"),
    ("tls,iam,awsprofile=a=b", "option 'awsprofile' value 'a=b' is invalid"),
    ("tls,mounttargetip=127.0.0.1:2049\nexec=/bin/sh", "contains a control or non-printable character"),
    ("tls,region=us-east-1\rx", "contains a control or non-printable character"),
]


@pytest.mark.parametrize("options, message", OPTION_CASES, ids=[c[0].encode("unicode_escape").decode()
                                                               for c in OPTION_CASES])
def test_bad_option_is_refused(host: Host, options: str, message: str) -> None:
    refused(host.run(mount_args(host, options)), 1, message)
    assert not host.state_dir.exists()  # refused before anything was created
    nothing_left(host)


DEVICE_CASES = [
    ("fs-123", "device 'fs-123' is not an EFS file system"),
    ("FS-12345678", "device 'FS-12345678' is not an EFS file system"),
    ("fs-1234567890abcdef", "is not an EFS file system"),  # 16 hex: neither 8 nor 17
    ("fs-12345678:data", "path 'data' in device is not absolute"),
    ("fs-12345678:/a/../b", "path '/a/../b' in device contains '..'"),
    ("fs-12345678:/a,b", "path '/a,b' in device contains a comma"),
    ("fs-12345678:/a\nb", "device 'fs-12345678:/a\\nb' contains a control or non-printable character"),
]


@pytest.mark.parametrize("device, message", DEVICE_CASES, ids=[c[0].encode("unicode_escape").decode()
                                                               for c in DEVICE_CASES])
def test_bad_device_is_refused(host: Host, device: str, message: str) -> None:
    refused(host.run(mount_args(host, "tls", device=device)), 1, message)
    nothing_left(host)


@pytest.mark.parametrize("argv, message", [
    ([FS], "expected a device and a mount point, got 1 arguments"),
    ([FS, "mnt/x"], "mount point 'mnt/x' is not absolute"),
    ([FS, "/mnt/x", "-x"], "unknown argument '-x'"),
    ([FS, "/mnt/x", "-o"], "argument -o needs a value"),
], ids=["one-argument", "relative-mountpoint", "unknown-flag", "o-without-value"])
def test_bad_arguments_are_refused(host: Host, argv: List[str], message: str) -> None:
    refused(host.run(argv), 1, message)
    nothing_left(host)


# --- configuration values -------------------------------------------------------------------

CONFIG_CASES = [
    ({"port_range_lower_bound": "abc"}, "[mount] port_range_lower_bound = 'abc' is invalid; use a whole number"),
    ({"port_range_lower_bound": "21000", "port_range_upper_bound": "21000"},
     "port_range_lower_bound 21000 is not below port_range_upper_bound 21000"),
    ({"port_range_upper_bound": "70000"}, "port_range_upper_bound = '70000' is invalid"),
    ({"stunnel_check_cert_hostname": "maybe"}, "stunnel_check_cert_hostname = 'maybe' is invalid; use true or false"),
    ({"retry_nfs_mount_command_count": "0"}, "retry_nfs_mount_command_count = '0' is invalid"),
    ({"dns_name_format": "{fs_id}.efs.{bucket}.amazonaws.com"}, "use only {az}, {fs_id}, {region} and"),
    ({"dns_name_format": "efs.{region}.amazonaws.com"}, "include the {fs_id} placeholder"),
    ({"dns_name_format": "{fs_id.efs.{region}.amazonaws.com"}, "fix the unbalanced { or }"),
    ({"dns_name_format": "{fs_id}=x.efs.{region}.amazonaws.com"}, "is not a valid host name; fix dns_name_format"),
    ({"dns_name_suffix": "amazonaws.com/x"}, "dns_name_suffix = 'amazonaws.com/x' is invalid"),
    ({"region": "us_east_1"}, "[mount] region = 'us_east_1' is invalid"),
    # Injection through the file: a continuation line, '=' and '[' in a path.
    ({"stunnel_cafile": "/etc/ca.pem\n  exec = /bin/sh"}, "is invalid; remove the control characters"),
    ({"stunnel_cafile": "/etc/ca=x.pem"}, "[mount] stunnel_cafile = '/etc/ca=x.pem' is invalid"),
    ({"stunnel_cafile": "/etc/[ca].pem"}, "[mount] stunnel_cafile = '/etc/[ca].pem' is invalid"),
    ({"efsplug:state_dir": "relative"}, "[efsplug] state_dir = 'relative' is invalid"),
    ({"efsplug:stunnel": "/usr/bin/stunnel;rm"}, "[efsplug] stunnel = '/usr/bin/stunnel;rm' is invalid"),
    ({"tail": "[mount.useast1]\nregion = us-east-1\n"}, "section [mount.useast1] does not name a region"),
    ({"tail": "[DEFAULT]\nstate_file_dir_mode = 799\n"}, "state_file_dir_mode = '799' is invalid"),
    ({"tail": "[mount\n"}, "cannot parse"),
    # efs-utils 3.x keys
    ({"az_id": "us-east-1a"}, "[mount] az_id = 'us-east-1a' is invalid; use an availability zone id like use1-az1"),
    ({"disable_fetch_ec2_metadata_token": "maybe"}, "disable_fetch_ec2_metadata_token = 'maybe' is invalid"),
    ({"stunnel_logs_file": "/var/log/{fs_id}\n  exec = /bin/sh"}, "is invalid; remove the control characters"),
    ({"tail": "[mount-watchdog]\nunmount_count_for_consistency = 0\n"}, "unmount_count_for_consistency = '0' is invalid"),
    ({"tail": "[mount-watchdog]\nstunnel_health_check_command_timeout_sec = x\n"},
     "stunnel_health_check_command_timeout_sec = 'x' is invalid"),
    ({"tail": "[client-info]\nsource = " + "k" * 101 + "\n"}, "[client-info] source = 'kkk"),
    ({"tail": "[cloudwatch-log]\nretention_in_days = 15\n"}, "[cloudwatch-log] retention_in_days = '15' is invalid"),
]


@pytest.mark.parametrize("change, message", CONFIG_CASES,
                         ids=[" ".join(f"{k}={v}" for k, v in c[0].items()).split("\n")[0][:40] for c in CONFIG_CASES])
def test_bad_config_value_is_refused(host: Host, change: Dict[str, str], message: str) -> None:
    mount = {k: v for k, v in change.items() if ":" not in k and k != "tail"}
    efsplug = {k.split(":", 1)[1]: v for k, v in change.items() if k.startswith("efsplug:")}
    host.write_config(mount, efsplug, change.get("tail", ""))
    line = refused(host.run(mount_args(host, "tls,mounttargetip=127.0.0.1")), 1, message)
    assert str(host.config) in line  # the file is named, so the operator knows where to look
    nothing_left(host)


def test_config_not_utf8(host: Host) -> None:
    host.config.write_bytes(b"[mount]\nregion = us-east-1\xff\n")
    refused(host.run(mount_args(host, "tls")), 1, "is not UTF-8 text")


def test_stock_efs_utils_keys_load_without_a_warning(host: Host) -> None:
    """The keys an efs-utils 3.2 file carries beyond the base config: no warning, no effect on -f."""
    host.write_config({"optimize_readahead": "true", "disable_fetch_ec2_metadata_token": "false",
                       "stunnel_logs_file": "/var/log/amazon/efs/{fs_id}.stunnel.log"},
                      tail="[mount-watchdog]\nunmount_count_for_consistency = 5\n"
                           "stunnel_health_check_command_timeout_sec = 30\n[client-info]\nsource = ecs\n"
                           "[cloudwatch-log]\nenabled = false\nlog_group_name = /aws/efs/utils\nretention_in_days = 14\n"
                           "[proxy]\nproxy_logging_level = INFO\n")
    res = host.run(["-f", *mount_args(host, "tls,mounttargetip=127.0.0.1")])
    assert (res.returncode, res.stderr) == (0, "")
    nothing_left(host)


def test_unknown_key_is_a_warning_not_an_error(host: Host) -> None:
    host.write_config({"stunnel_cafle": "/etc/ca.pem"})
    res = host.run(["-f", *mount_args(host, "tls,mounttargetip=127.0.0.1")])  # -f: everything but the mount
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        f"mount.efs: warning: {host.config}: [mount] unknown key 'stunnel_cafle' ignored; check its spelling"]
    nothing_left(host)


# --- the caller and the mount point ----------------------------------------------------------

def test_not_root(host: Host) -> None:
    """As nobody: the temp config is unreadable to it, so the defaults apply (no EFSPLUG_CONFIG)."""
    res = host.run(mount_args(host, "tls,mounttargetip=127.0.0.1,region=us-east-1"), as_nobody=True,
                   env={"EFSPLUG_CONFIG": ""})
    refused(res, 32, "mount.efs must run as root; use sudo")
    nothing_left(host)


def test_mount_point_missing(host: Host) -> None:
    res = host.run([FS, host.mnt + "/missing", "-o", "tls,mounttargetip=127.0.0.1"])
    refused(res, 32, f"mount point '{host.mnt}/missing' is not a directory; create it with mkdir -p")
    nothing_left(host)


def test_mount_point_through_a_symlink_to_an_unprintable_name(host: Host) -> None:
    """The resolved path is what the record and the kernel keep: it is checked as the given one is."""
    target = Path(host.mnt) / "evil\nname"
    target.mkdir()
    (Path(host.mnt) / "link").symlink_to(target)
    res = host.run([FS, host.mnt + "/link", "-o", "tls,mounttargetip=127.0.0.1"])
    refused(res, 1, "mount point")
    assert "contains a control or non-printable character; remove it" in res.stderr
    nothing_left(host)


def test_crossaccount_without_instance_metadata(host: Host) -> None:
    """crossaccount names the target by this instance's AZ id; without IMDS there is none to use."""
    res = host.run(mount_args(host, "tls,crossaccount"))
    refused(res, 32, "crossaccount needs this instance's availability zone id and instance metadata did not give it")
    nothing_left(host)


def test_web_identity_token_file_missing(host: Host) -> None:
    """rolearn/jwtpath is the only source tried: no silent fall back to another identity."""
    res = host.run(mount_args(host, f"tls,iam,rolearn={ROLE},jwtpath={host.root}/no-token,mounttargetip=127.0.0.1"))
    refused(res, 32, f"web identity for {ROLE}: cannot read token file {host.root}/no-token (No such file or directory)")
    nothing_left(host)


@pytest.mark.parametrize("netns, message", [
    ("/run/netns/efsplug-no-such-ns", "netns /run/netns/efsplug-no-such-ns: No such file or directory"),
    ("/proc/self/ns/uts", "netns '/proc/self/ns/uts' is not a network namespace"),
    ("/dev/null", "netns '/dev/null' is not a network namespace"),
], ids=["missing", "not-a-network-namespace", "a-device"])
def test_bad_netns(host: Host, netns: str, message: str) -> None:
    refused(host.run(mount_args(host, f"tls,netns={netns},mounttargetip=127.0.0.1")), 32, message)
    nothing_left(host)


def test_netns_fifo_is_refused_without_blocking(host: Host) -> None:
    """Opening a FIFO blocks until a writer comes: the mount (and a volume's lock) would hang."""
    fifo = host.root / "netns-fifo"
    os.mkfifo(fifo)
    res = host.run(mount_args(host, f"tls,netns={fifo},mounttargetip=127.0.0.1"))
    refused(res, 32, f"netns '{fifo}' is not a network namespace")
    nothing_left(host)


# --- failures after the tunnel started (real stunnel, host kernel without NFS) ----------------

@pytest.fixture(params=["per-mount", "shared"])
def traced_stunnel(host: Host, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A stunnel wrapper that records its pid (kept by exec) and its parent's: proof the
    tunnel really ran, and of who started it; with a process per tunnel, and shared."""
    started = host.root / "stunnel-pids"
    wrapper = host.root / "stunnel-traced"
    wrapper.write_text(f"#!/bin/sh\necho $$ $PPID >> {started}\nexec /usr/bin/stunnel \"$@\"\n")
    wrapper.chmod(0o755)
    host.write_config(efsplug={"stunnel": str(wrapper), "tunnel_process": request.param})
    yield started
    if started.exists():  # the tunnel ran where the mode says
        assert (host.state_dir / "hosts").exists() == (request.param == "shared")


def started_and_gone(started: Path) -> List[int]:
    pids = [int(line.split()[0]) for line in started.read_text().splitlines()]
    assert pids and not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                            for pid in pids)
    return pids


@pytest.mark.parametrize("options, home_profile", [
    ("tls,mounttargetip=127.0.0.1", False),
    (f"tls,iam,awsprofile=default,accesspoint={AP},mounttargetip=127.0.0.1", True),
    ("tls,stunnel,mounttargetip=::1", False),  # stunnel must accept the IPv6 connect line it is given
], ids=["tls", "tls-iam-accesspoint", "tls-ipv6-target"])
def test_failed_kernel_mount_after_tunnel_cleans_up(host: Host, traced_stunnel: Path, options: str,
                                                    home_profile: bool) -> None:
    """Real: the tunnel starts (and listens), then the host kernel refuses NFS ("No such device")."""
    if home_profile:
        (host.root / "home" / ".aws").mkdir()
        (host.root / "home" / ".aws" / "credentials").write_text(
            "[default]\naws_access_key_id = AKIAEFSBEDHOST000000\naws_secret_access_key = not-a-real-secret\n")
    res = host.run(mount_args(host, options))
    refused(res, 32, "mount.nfs4 failed: mount.nfs4: No such device; this kernel has no NFS client")
    assert "not-a-real-secret" not in res.stderr
    started_and_gone(traced_stunnel)
    nothing_left(host)
    if home_profile:
        assert (host.state_dir / "privateKey.pem").stat().st_mode & 0o777 == 0o400  # kept, root-only


def test_ca_bundle_stunnel_cannot_load(host: Host, traced_stunnel: Path) -> None:
    """Real: stunnel starts and exits at once because the CA file holds no certificate."""
    empty = host.root / "empty-ca.pem"
    empty.write_text("")
    res = host.run(mount_args(host, f"tls,cafile={empty},mounttargetip=127.0.0.1"))
    line = refused(res, 32, "TLS tunnel to 127.0.0.1 did not start: stunnel exited with status")
    assert f"the CA bundle {empty} is missing or empty" in line
    started_and_gone(traced_stunnel)
    nothing_left(host)


def test_port_range_exhausted(host: Host) -> None:
    """Real: the only port in the range is taken by a listener this test holds."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        host.write_config({"port_range_lower_bound": str(port), "port_range_upper_bound": str(port + 1)})
        res = host.run(mount_args(host, "tls,mounttargetip=127.0.0.1"))
        refused(res, 32, f"no free port in {port}-{port + 1}: 1 tunnels are running")
        res = host.run(mount_args(host, f"tls,tlsport={port},mounttargetip=127.0.0.1"))
        refused(res, 32, f"no free port in {port}-{port + 1}")
    nothing_left(host)
