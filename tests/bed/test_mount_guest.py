"""`mount -t efs` typed as an operator would, in the real kernel guest, against the whole bed.

Every mount here is verified end to end: a file written in the guest must appear in the
right export directory on the host, and for IAM mounts the endpoint must have seen the
expected access key id and access point. Each test unmounts what it mounted; the
`clean_guest` fixture fails it otherwise and removes tunnels and state afterwards.
"""

from __future__ import annotations

import json
import secrets

import pytest

from efsbed.bed import MT_IPV6, REPO, Bed
from efsplug.credentials import detail_tag
from efsbed.guestmount import (
    NOTHING_LEFT, accepted_as, leftovers, guest_config, guest_file, kernel_mounts, mount, mount_of, new_connections,
    profile_text, record_for, records, sh, write_and_find,
)

pytestmark = pytest.mark.guest

EFSPLUG = REPO / ".venv" / "bin" / "efsplug"


# --- data paths -----------------------------------------------------------------------------

def test_plain_nfs_without_options(bed: Bed, clean_guest: Bed) -> None:
    before = len(bed.endpoint.connection_events())
    with mount_of(bed, "/mnt/plain", ""):
        write_and_find(bed, "/mnt/plain", bed.export_dir)
        line = next(l for l in bed.run(["cat", "/proc/mounts"]).stdout.splitlines() if " /mnt/plain " in l)
        assert line.startswith(f"{bed.dns_name}:/ ") and "port=" not in line  # straight to the mount target
    assert records(bed) == []  # no tunnel, nothing for the supervisor
    accepted_as(bed, before, key=None, access_point=None, transport="plain")


def test_plain_nfs_refused_when_iam_is_required(bed: Bed, clean_guest: Bed) -> None:
    """The mount target answers the client's calls with AUTH_ERROR, as EFS does: access denied."""
    bed.endpoint.reconfigure(iam_required=True)
    try:
        before = len(bed.endpoint.connection_events())
        res = mount(bed, "/mnt/plain")
    finally:
        bed.endpoint.reconfigure(iam_required=False)
    assert res.rc == 32
    assert res.stderr.splitlines() == [
        f"mount.efs: mount.nfs4 failed: mount.nfs4: access denied by server while mounting {bed.dns_name}:/; the "
        "file system policy may require IAM authorization (mount with -o tls,iam); also check that the path exists "
        "on the file system"]
    reasons = {e["reason"] for e in new_connections(bed, before)}
    assert reasons == {"plain NFS refused: IAM authorization required"}


def test_tls(bed: Bed, clean_guest: Bed) -> None:
    before = len(bed.endpoint.connection_events())
    with mount_of(bed, "/mnt/tls", "tls"):
        write_and_find(bed, "/mnt/tls", bed.export_dir)
        record = record_for(bed, "/mnt/tls")
        assert (record["tls"], record["iam"], record["access_point"]) == (True, False, None)
        assert f"port={record['port']}" in sh(bed, "grep ' /mnt/tls ' /proc/mounts").stdout
    accepted_as(bed, before, key=None, access_point=None)


def test_tls_iam_with_a_profile(bed: Bed, clean_guest: Bed) -> None:
    c = bed.credentials.issue("guest-profile")
    before = len(bed.endpoint.connection_events())
    with guest_file(bed, "/root/.aws/credentials", profile_text(c, name="efs-team")):
        with mount_of(bed, "/mnt/profile", "tls,iam,awsprofile=efs-team"):
            write_and_find(bed, "/mnt/profile", bed.export_dir)
            assert record_for(bed, "/mnt/profile")["credential_source"] == "profile:efs-team"
    accepted_as(bed, before, key=c.access_key_id, access_point=None)


def test_tls_iam_with_awscredsuri(bed: Bed, clean_guest: Bed) -> None:
    rel = "task-" + secrets.token_hex(4)
    c = bed.task_credentials.grant(rel)
    uri = bed.task_credentials.path_of(rel)
    before = len(bed.endpoint.connection_events())
    try:
        with mount_of(bed, "/mnt/task", f"tls,iam,awscredsuri={uri}"):
            write_and_find(bed, "/mnt/task", bed.export_dir)
            record = record_for(bed, "/mnt/task")
            assert record["credential_source"] == f"awscredsuri:{uri}"  # root-only: the supervisor renews from it
            status = bed.run([str(EFSPLUG), "status"]).stdout + bed.run([str(EFSPLUG), "status", "--json"]).stdout
            assert f"awscredsuri {detail_tag(uri)}" in status and rel not in status, status
            assert record["credential_expiry"] == c.expiry.isoformat()
    finally:
        bed.task_credentials.revoke(rel)
    accepted_as(bed, before, key=c.access_key_id, access_point=None)
    assert bed.task_credentials.requests(rel) >= 1


def test_tls_iam_with_the_instance_role(bed: Bed, clean_guest: Bed) -> None:
    bed.run(["rm", "-rf", "/root/.aws"])  # nothing earlier in the chain
    before = len(bed.endpoint.connection_events())
    with mount_of(bed, "/mnt/role", "tls,iam"):
        write_and_find(bed, "/mnt/role", bed.export_dir)
        assert record_for(bed, "/mnt/role")["credential_source"] == "instance"
    accepted_as(bed, before, key=bed.imds.role_credentials.access_key_id, access_point=None)


def test_access_points_are_separate_roots(bed: Bed, clean_guest: Bed) -> None:
    a, b = bed.access_points[:2]
    role_key = bed.imds.role_credentials.access_key_id
    before = len(bed.endpoint.connection_events())
    with mount_of(bed, "/mnt/ap-a", f"tls,iam,accesspoint={a.id}"):
        accepted_as(bed, before, key=role_key, access_point=a.id)
        before_b = len(bed.endpoint.connection_events())
        with mount_of(bed, "/mnt/ap-b", f"tls,iam,accesspoint={b.id}"):
            accepted_as(bed, before_b, key=role_key, access_point=b.id)
            in_a = write_and_find(bed, "/mnt/ap-a", a.export_dir)
            in_b = write_and_find(bed, "/mnt/ap-b", b.export_dir)
            listing_a = sh(bed, "ls -a /mnt/ap-a").stdout.split()
            listing_b = sh(bed, "ls -a /mnt/ap-b").stdout.split()
            assert in_a in listing_a and in_b not in listing_a
            assert in_b in listing_b and in_a not in listing_b
            assert not (bed.export_dir / in_a).exists()  # the root export does not get it either
            assert record_for(bed, "/mnt/ap-b")["access_point"] == b.id


@pytest.mark.parametrize("mountpoint", [
    "/var/lib/ecs/volumes/ecs-" + "long-task-family-" * 12 + "3-data-e4b1c2d3e4f5a6b7c8d9",
    "/mnt/with:colon",
    "/mnt/with spaces and ümlauts",  # control characters are refused, deliberately (test_options)
], ids=["long-ecs-volume-name", "colon", "space-and-non-ascii"])
def test_iam_access_point_mount_at_a_long_or_unusual_mount_point(bed: Bed, clean_guest: Bed, mountpoint: str) -> None:
    ap = bed.access_points[0]
    with mount_of(bed, mountpoint, f"tls,iam,accesspoint={ap.id}"):
        write_and_find(bed, mountpoint, ap.export_dir)
        assert record_for(bed, mountpoint)["access_point"] == ap.id


def test_mount_efs_run_directly_on_a_symlink_records_the_kernels_mount_point(bed: Bed, clean_guest: Bed) -> None:
    """mount(8) resolves a symlinked mount point before it runs the helper; a caller that runs
    mount.efs itself need not. The record must name what the kernel's table names: otherwise
    status and the supervisor take the live mount for one that is gone."""
    sh(bed, "mkdir -p /mnt/real-target && ln -sfn /mnt/real-target /mnt/via-link", timeout=30)
    try:
        res = bed.run(["/sbin/mount.efs", bed.fs_id, "/mnt/via-link", "-o", "tls"], timeout=90)
        assert res.rc == 0, res
        assert "/mnt/real-target" in kernel_mounts(bed)
        try:
            assert record_for(bed, "/mnt/real-target")["tls"] is True
            write_and_find(bed, "/mnt/via-link", bed.export_dir)
            (view,) = json.loads(bed.run([str(EFSPLUG), "status", "--json"]).stdout)
            assert (view["mountpoint"], view["mounted"]) == ("/mnt/real-target", True), view
        finally:
            assert bed.run(["umount", "/mnt/real-target"], timeout=60).rc == 0
    finally:
        sh(bed, "rm -f /mnt/via-link", timeout=30)


def test_accesspoint_without_iam(bed: Bed, clean_guest: Bed) -> None:
    """An access point alone travels in a certificate with no IAM block."""
    ap = bed.access_points[0]
    before = len(bed.endpoint.connection_events())
    with mount_of(bed, "/mnt/ap-only", f"tls,accesspoint={ap.id}"):
        write_and_find(bed, "/mnt/ap-only", ap.export_dir)
    accepted_as(bed, before, key=None, access_point=ap.id)


# --- how the mount is asked for ---------------------------------------------------------------

def test_subdirectory(bed: Bed, clean_guest: Bed) -> None:
    sub = bed.export_dir / "projects" / "one"
    sub.mkdir(parents=True, exist_ok=True)
    with mount_of(bed, "/mnt/sub", "tls", device=f"{bed.fs_id}:/projects/one"):
        write_and_find(bed, "/mnt/sub", sub)
        assert record_for(bed, "/mnt/sub")["path"] == "/projects/one"


def test_fstab_line(bed: Bed, clean_guest: Bed) -> None:
    original = bed.run(["cat", "/etc/fstab"]).stdout
    line = f"{bed.fs_id}:/ /mnt/fstab efs _netdev,tls,iam 0 0\n"
    bed.run(["mkdir", "-p", "/mnt/fstab"])
    bed.guest.run(["tee", "/etc/fstab"], input=(original + line).encode(), check=True)
    try:
        res = bed.run(["mount", "/mnt/fstab"], timeout=90)
        assert (res.rc, res.stderr) == (0, ""), res
        try:
            write_and_find(bed, "/mnt/fstab", bed.export_dir)
            assert "_netdev" not in record_for(bed, "/mnt/fstab").get("config_file", "")
            assert "_netdev" not in sh(bed, "grep ' /mnt/fstab ' /proc/mounts").stdout
        finally:
            assert bed.run(["umount", "/mnt/fstab"], timeout=60).rc == 0
    finally:
        bed.guest.run(["tee", "/etc/fstab"], input=original.encode(), check=True)


def test_mounttargetip(bed: Bed, clean_guest: Bed) -> None:
    ip = bed.seeded.mount_target_ip
    with mount_of(bed, "/mnt/ip", f"tls,mounttargetip={ip}"):
        write_and_find(bed, "/mnt/ip", bed.export_dir)
        conf = bed.run(["cat", record_for(bed, "/mnt/ip")["config_file"]]).stdout
        assert f"connect = {ip}:2049" in conf and f"checkHost = {bed.dns_name}" in conf


def tunnel_peers(bed: Bed) -> str:
    """The guest's established TCP connections (ss prints an IPv6 peer as [addr]:port)."""
    return bed.run(["ss", "-Htn", "state", "established"]).stdout


def test_ipv6_mount_target_by_mounttargetip(bed: Bed, clean_guest: Bed) -> None:
    """The tunnel connects to the IPv6 address; TLS still checks the file system's name."""
    with mount_of(bed, "/mnt/ip6", f"tls,mounttargetip={MT_IPV6}"):
        write_and_find(bed, "/mnt/ip6", bed.export_dir)
        conf = bed.run(["cat", record_for(bed, "/mnt/ip6")["config_file"]]).stdout
        assert f"connect = {MT_IPV6}:2049" in conf and f"checkHost = {bed.dns_name}" in conf
        assert f"[{MT_IPV6}]:2049" in tunnel_peers(bed)


def test_ipv6_mount_target_by_its_aaaa_record(bed: Bed, clean_guest: Bed) -> None:
    """A name with only an AAAA record resolves: no API fall-back, the tunnel dials it over IPv6."""
    name = f"ipv6only.{bed.dns_name}"
    assert bed.run(["getent", "ahostsv4", name]).rc == 2  # no IPv4 address at all
    with guest_config(bed, "dns_name_format = ipv6only.{fs_id}.efs.{region}.{dns_name_suffix}\n"):
        with mount_of(bed, "/mnt/aaaa", "tls"):
            write_and_find(bed, "/mnt/aaaa", bed.export_dir)
            conf = bed.run(["cat", record_for(bed, "/mnt/aaaa")["config_file"]]).stdout
            assert f"connect = {name}:2049" in conf
            assert f"[{MT_IPV6}]:2049" in tunnel_peers(bed)


ROLE = "arn:aws:iam::123456789012:role/efsbed-web-identity"
JWT = "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"


def sts_env(bed: Bed) -> dict:
    return {"AWS_ENDPOINT_URL_STS": f"http://10.0.2.2:{bed.sts.port}"}


def test_tls_iam_with_rolearn_and_jwtpath(bed: Bed, clean_guest: Bed) -> None:
    token = "eyJ" + secrets.token_urlsafe(48)  # opaque to the client: STS checks it
    bed.sts.trust(ROLE, token)
    before = len(bed.endpoint.connection_events())
    with guest_file(bed, JWT, token):
        with mount_of(bed, "/mnt/web", f"tls,iam,rolearn={ROLE},jwtpath={JWT}", env=sts_env(bed)):
            write_and_find(bed, "/mnt/web", bed.export_dir)
            assert record_for(bed, "/mnt/web")["credential_source"].startswith("webidentity:")
    issued = bed.sts.issued(ROLE)
    assert len(issued) >= 1
    accepted_as(bed, before, key=issued[-1].access_key_id, access_point=None)


def test_rolearn_refused_by_sts(bed: Bed, clean_guest: Bed) -> None:
    """A token STS does not trust: one line naming the cause and the fix, nothing left behind."""
    with guest_file(bed, JWT, "eyJ" + secrets.token_urlsafe(48)):
        res = mount(bed, "/mnt/web", f"tls,iam,rolearn={ROLE},jwtpath={JWT}", env=sts_env(bed))
    assert res.rc == 32, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "AccessDenied" in lines[0] and "trust policy" in lines[0], res.stderr
    assert leftovers(bed) == NOTHING_LEFT


NO_DNS_FORMAT = "dns_name_format = nodns.{fs_id}.efs.{region}.{dns_name_suffix}\n"


def test_describe_mount_targets_fallback(bed: Bed, clean_guest: Bed) -> None:
    """The name does not resolve (no hosts entry, no DNS): the EFS API names the target's IP.

    The API call is signed with the instance role's credentials (botocore's chain, IMDS).
    """
    env = {"AWS_ENDPOINT_URL_EFS": f"http://10.0.2.2:{bed.moto.port}"}
    with guest_config(bed, NO_DNS_FORMAT):
        assert bed.run(["getent", "hosts", f"nodns.{bed.dns_name}"]).rc == 2
        with mount_of(bed, "/mnt/fallback", "tls", env=env):
            write_and_find(bed, "/mnt/fallback", bed.export_dir)
            conf = bed.run(["cat", record_for(bed, "/mnt/fallback")["config_file"]]).stdout
            assert f"connect = {bed.seeded.mount_target_ip}:2049" in conf
            assert f"checkHost = nodns.{bed.dns_name}" in conf  # covered by the server's wildcard


def test_unresolvable_name_without_fallback(bed: Bed, clean_guest: Bed) -> None:
    with guest_config(bed, NO_DNS_FORMAT + "fall_back_to_mount_target_ip_address_enabled = false\n"):
        res = mount(bed, "/mnt/fallback", "tls")
    assert res.rc == 32
    assert res.stderr.splitlines() == [
        f"mount.efs: cannot resolve nodns.{bed.dns_name}; check that {bed.fs_id} exists in {bed.region}, that the "
        "VPC has DNS resolution enabled, or pass mounttargetip=<ip> (the IP fallback is disabled in efs-utils.conf)"]
    assert records(bed) == []
