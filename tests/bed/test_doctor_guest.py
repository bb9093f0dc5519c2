"""`efsplug doctor` in the kernel guest: each common cause of a failing EFS mount injected for
real (a firewall drop of 2049, no DNS record, a foreign CA, credentials the endpoint
refuses, an unknown access point, no instance metadata, no efsAuth line, a held port
range), named with its fix; a healthy setup passes every check; nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from efsbed.aws import client
from efsbed.bed import Bed
from efsbed.ca import BedCA
from efsbed.guestdaemons import EFSPLUG, GuestAgent, serving_agent

pytestmark = pytest.mark.guest

ECS_CONFIG = "/etc/ecs/ecs.config"
EFS_AUTH = 'ECS_VOLUME_PLUGIN_CAPABILITIES=["efsAuth"]\n'


@pytest.fixture(scope="module")
def access_point(bed: Bed) -> Iterator[str]:
    """An access point EFS (moto) knows, served by the endpoint from its own root."""
    efs = client("efs", bed.moto.endpoint_url, bed.region)
    made = efs.create_access_point(FileSystemId=bed.fs_id, PosixUser={"Uid": 4300, "Gid": 4300}, RootDirectory={
        "Path": "/doctor", "CreationInfo": {"OwnerUid": 4300, "OwnerGid": 4300, "Permissions": "0750"}})
    try:
        yield made["AccessPointId"]
    finally:
        efs.delete_access_point(AccessPointId=made["AccessPointId"])


@pytest.fixture(scope="module")
def agent(bed: Bed) -> Iterator[GuestAgent]:
    """The agent on its plugin socket, and the ECS config that sends ECS to it."""
    bed.run(["mkdir", "-p", "/etc/ecs"], check=True)
    bed.run(["tee", ECS_CONFIG], input=("ECS_CLUSTER=doctor\n" + EFS_AUTH).encode(), check=True)
    try:
        with serving_agent(bed, bed.efs_api_env()) as a:
            yield a
    finally:
        bed.run(["rm", "-rf", "/etc/ecs"])


def doctor(bed: Bed, options: str = "", *, device: Optional[str] = None, env: Optional[Dict[str, str]] = None,
           json_output: bool = False) -> tuple:
    argv = [EFSPLUG, "doctor", device or bed.fs_id] + (["-o", options] if options else [])
    res = bed.run(argv + (["--json"] if json_output else []), env={**bed.efs_api_env(), **(env or {})}, timeout=120)
    return res.rc, res.stdout + res.stderr


def line(output: str, name: str) -> str:
    return next(text for text in output.splitlines() if text.split(None, 1)[1:] and
                text.split(None, 1)[1].startswith(f"{name}:"))


def left_behind(bed: Bed) -> List[str]:
    """What a run could have left: tunnels, records, per-mount directories, listeners in the range."""
    found = bed.run(["sh", "-c", "pgrep -a '^stunnel' ; ls /run/efs 2>/dev/null | grep -e '[.]json$' -e '^fs-' ;"
                                 " ss -Hltn '( sport >= :20049 and sport < :21049 )'"]).stdout
    return [text for text in found.splitlines() if text.strip()]


def test_a_healthy_setup_passes_every_check_and_leaves_nothing(clean_guest: Bed, agent: GuestAgent,
                                                                access_point: str) -> None:
    bed = clean_guest
    before = len(bed.endpoint.connection_events())
    rc, out = doctor(bed, f"tls,iam,accesspoint={access_point}")
    assert rc == 0, out + "\nthe endpoint saw: " + json.dumps(bed.endpoint.connection_events()[before:])
    assert "FAIL" not in out and out.rstrip().endswith("all checks passed"), out
    for name in ("stunnel", "kernel-nfs", "state-dir", "ports", "ecs-efsauth", "plugin-socket", "imds", "region",
                 "dns", "port-2049", "credentials", "access-point", "nfs"):
        assert line(out, name).startswith("ok "), line(out, name)
    assert "answered; tunnel removed" in line(out, "nfs")
    role = bed.imds.role_credentials
    assert role.secret_access_key not in out and (role.session_token or "") not in out  # never a secret
    assert left_behind(bed) == []
    rc, out = doctor(bed, "tls", json_output=True)
    document = json.loads(out)
    assert rc == 0 and document["ok"] is True
    assert {c["name"]: c["status"] for c in document["checks"]}["credentials"] == "skipped"  # no iam: does not apply
    assert left_behind(bed) == []


def test_a_firewall_drop_of_2049_is_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    with dropping_2049(bed) as (options, target):
        rc, out = doctor(bed, options)
    assert rc == 1
    assert line(out, "port-2049").startswith("FAIL") and f"mount target {target} does not answer on port 2049" \
        in line(out, "port-2049") and "allow inbound TCP 2049 from this host in the mount target's security group" \
        in line(out, "port-2049")
    assert "not run: port-2049 failed" in line(out, "nfs")
    assert left_behind(bed) == []


DROP_IP = "198.51.100.7"  # TEST-NET-2: a mount target address of the guest's own


@contextlib.contextmanager
def dropping_2049(bed: Bed) -> Iterator[Tuple[str, str]]:
    """TCP 2049 to the mount target silently dropped, as a security group does: (options, target).

    With netfilter in the guest kernel (Debian 12's), an iptables DROP rule on the real
    mount target. Without it (the 7.x kernel on AMX machines has no ip_tables), the same
    drop by the kernel itself: SYNs to a listener whose accept queue is full are dropped
    unanswered, so the target is an address of the guest's own with such a listener.
    """
    rule = ["OUTPUT", "-p", "tcp", "-d", bed.seeded.mount_target_ip, "--dport", "2049", "-j", "DROP"]
    if bed.run(["iptables-legacy", "-A", *rule]).rc == 0:
        try:
            yield "tls", bed.dns_name
        finally:
            bed.run(["iptables-legacy", "-D", *rule], check=True)
        return
    bed.run(["ip", "addr", "add", f"{DROP_IP}/32", "dev", "lo"], check=True)
    log = "/var/log/bed/full-listener.log"
    holder = bed.guest.spawn(["python3", "-c", (
        "import socket, time\n"
        f"listener = socket.create_server(('{DROP_IP}', 2049), backlog=0)\n"
        f"queued = socket.create_connection(('{DROP_IP}', 2049))  # the accept queue is full from here\n"
        "print('full', flush=True)\n"
        "time.sleep(600)\n")], log=log)
    try:
        wait_for_line(bed, log, "full")
        yield f"tls,mounttargetip={DROP_IP}", DROP_IP
    finally:
        bed.guest.kill(holder, 9)
        bed.run(["ip", "addr", "del", f"{DROP_IP}/32", "dev", "lo"])


def wait_for_line(bed: Bed, log: str, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in bed.run(["cat", log]).stdout:
        assert time.monotonic() < deadline, f"{log} never said {text!r}"
        time.sleep(0.1)  # polling the guest for a helper's line, bounded


def test_a_file_system_without_a_dns_record_is_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    missing = "fs-0000000000000dead"
    rc, out = doctor(bed, "tls", device=missing)
    assert rc == 1 and line(out, "dns").startswith("FAIL"), out
    assert f"cannot resolve {missing}.efs.{bed.region}.amazonaws.com" in line(out, "dns")
    assert "not run: dns failed" in line(out, "port-2049")


def test_a_foreign_ca_is_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    other = BedCA.create(bed.workdir / f"foreign-ca-{secrets.token_hex(3)}", name="another CA")
    rc, out = doctor(bed, f"tls,cafile={other.cert_path}")
    assert rc == 1 and line(out, "nfs").startswith("FAIL"), out
    assert "rejected" in line(out, "nfs") and "certificate" in line(out, "nfs") and "stunnel_cafile" in line(out, "nfs")
    assert line(out, "port-2049").startswith("ok")  # the network is fine: TLS is what fails
    assert left_behind(bed) == []


def test_credentials_the_endpoint_refuses_are_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    refused = bed.imds.role_credentials
    bed.credentials.revoke(refused.access_key_id)
    try:
        rc, out = doctor(bed, "tls,iam")
    finally:
        bed.imds.rotate_role_credentials()  # a valid instance role again for the tests after this one
    assert rc == 1 and line(out, "credentials").startswith("ok"), out  # found: EFS is who refuses them
    assert line(out, "nfs").startswith("FAIL") and f"access key {refused.access_key_id}" in line(out, "nfs")
    assert "check that the credentials are valid and current" in line(out, "nfs")
    assert refused.secret_access_key not in out
    assert left_behind(bed) == []


def test_an_unknown_access_point_is_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    unknown = "fsap-0123456789abcdef0"
    rc, out = doctor(bed, f"tls,accesspoint={unknown}")
    assert rc == 1
    assert line(out, "access-point") == (
        f"FAIL    access-point: the access point exists, is available and belongs to the file system: access point "
        f"{unknown} does not exist in {bed.region}; check accesspoint= (aws efs describe-access-points "
        f"--file-system-id {bed.fs_id})")
    assert "not run: access-point failed" in line(out, "nfs")


def test_unreachable_instance_metadata_is_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    rc, out = doctor(bed, "tls,iam", env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://169.254.169.253"})
    assert rc == 1 and line(out, "imds").startswith("FAIL"), out
    assert "http://169.254.169.253" in line(out, "imds") and "--http-put-response-hop-limit 2" in line(out, "imds")
    assert "not run: imds failed" in line(out, "region")


def test_a_missing_efsauth_line_is_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    bed.run(["tee", ECS_CONFIG], input=b"ECS_CLUSTER=doctor\n", check=True)
    try:
        res = bed.run([EFSPLUG, "doctor"])
        rc, out = res.rc, res.stdout
    finally:
        bed.run(["tee", ECS_CONFIG], input=("ECS_CLUSTER=doctor\n" + EFS_AUTH).encode(), check=True)
    assert rc == 1 and line(out, "ecs-efsauth") == (
        "FAIL    ecs-efsauth: ECS agent told to use the plugin (efsAuth): ECS_VOLUME_PLUGIN_CAPABILITIES is not set in "
        f"{ECS_CONFIG}, so the ECS agent mounts EFS volumes with plain NFS, without TLS or IAM; add the line "
        f'ECS_VOLUME_PLUGIN_CAPABILITIES=["efsAuth"] to {ECS_CONFIG} and restart ecs')
    assert line(out, "plugin-socket").startswith("ok")


def test_a_held_port_range_is_named(clean_guest: Bed, agent: GuestAgent) -> None:
    bed = clean_guest
    bed.write_guest_config(f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\nport_range_lower_bound = 20049\n"
                           "port_range_upper_bound = 20051\n")
    holder = bed.guest.spawn(["python3", "-c", (
        "import socket, sys, time\n"
        "held = [socket.create_server(('127.0.0.1', p)) for p in (20049, 20050)]\n"
        "print('holding', flush=True)\n"
        "time.sleep(600)\n")], log="/var/log/bed/port-holder.log")
    try:
        wait_for_line(bed, "/var/log/bed/port-holder.log", "holding")
        rc, out = doctor(bed, "tls")
    finally:
        bed.guest.kill(holder, 9)
        bed.write_guest_config(f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\n")
    assert rc == 1 and line(out, "ports") == (
        "FAIL    ports: a free port in the tunnel port range: no free port in 20049-20051: 2 tunnels are running; "
        "widen port_range_upper_bound in efs-utils.conf or unmount unused file systems")
    assert "not run: ports failed" in line(out, "nfs")
