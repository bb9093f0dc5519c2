"""The bed itself, proven with hand-made parts: no product code between the kernel and the endpoint.

A stunnel client configured by hand inside the guest carries a real kernel NFSv4.1 mount
to the emulated EFS endpoint; certificates for the IAM cases come from efsplug.certificate
but the tunnel, the mount and the checks are plain tools.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from efsbed import procs
from efsbed.bed import Bed
from efsplug import certificate

pytestmark = pytest.mark.guest

TUNNEL_PORT = 20999  # outside the product's default range, so no product tunnel collides


def _stunnel_config(bed: Bed, workdir: Path, *, port: int, cert: str = "", key: str = "") -> Path:
    lines = [
        "foreground = yes",
        f"pid = {workdir}/stunnel-{port}.pid",
        "[efs]",
        "client = yes",
        f"accept = 127.0.0.1:{port}",
        f"connect = {bed.dns_name}:2049",
        "verify = 2",
        f"CAfile = {bed.ca.cert_path}",
        f"checkHost = {bed.dns_name}",
    ]
    if cert:
        lines += [f"cert = {cert}", f"key = {key}"]
    path = workdir / f"stunnel-{port}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_stunnel(bed: Bed, config: Path, port: int) -> int:
    pid = bed.guest.spawn(["stunnel4", str(config)], log=f"/tmp/stunnel-{port}.log")
    probe = (
        "import socket,sys,time\n"
        f"end=time.monotonic()+10\n"
        "while time.monotonic()<end:\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1',{port}),0.2).close(); sys.exit(0)\n"
        "    except OSError: time.sleep(0.02)\n"
        "sys.exit(1)\n"
    )
    bed.run(["python3", "-c", probe], timeout=20).rc == 0 or pytest.fail(
        "hand-made stunnel did not listen: " + bed.run(["cat", f"/tmp/stunnel-{port}.log"]).stdout
    )
    return pid


def _nfs_mount(bed: Bed, port: int, mountpoint: str):
    bed.run(["mkdir", "-p", mountpoint])
    options = f"nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,port={port}"
    return bed.run(["mount", "-t", "nfs4", "-o", options, "127.0.0.1:/", mountpoint], timeout=60)


@pytest.fixture
def workdir(bed):
    path = bed.workdir / "handmade" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    return path


def test_hand_made_tunnel_carries_a_kernel_nfs_mount_to_the_export(clean_guest, workdir):
    bed = clean_guest
    config = _stunnel_config(bed, workdir, port=TUNNEL_PORT)
    pid = _start_stunnel(bed, config, TUNNEL_PORT)
    try:
        mounted = _nfs_mount(bed, TUNNEL_PORT, "/mnt/handmade")
        assert mounted.rc == 0, mounted.stderr
        try:
            name = f"from-guest-{uuid.uuid4().hex[:8]}"
            bed.run(["sh", "-c", f"echo written-in-the-kernel > /mnt/handmade/{name}"], timeout=30, check=True)
            assert (bed.export_dir / name).read_text() == "written-in-the-kernel\n"
            mounts = bed.run(["grep", "/mnt/handmade", "/proc/mounts"]).stdout
            assert f"port={TUNNEL_PORT}" in mounts and "vers=4.1" in mounts
        finally:
            assert bed.run(["umount", "/mnt/handmade"], timeout=30).rc == 0
    finally:
        bed.guest.kill(pid)
    accepted = [e for e in bed.endpoint.connection_events() if e["event"] == "accepted"]
    assert accepted, "the endpoint saw no accepted TLS connection"


def test_access_point_a_sees_its_root_and_nothing_of_b(clean_guest, workdir):
    bed = clean_guest
    ap_a, ap_b = bed.access_points[0], bed.access_points[1]
    (ap_a.export_dir / "only-in-a").write_text("a\n")
    (ap_b.export_dir / "only-in-b").write_text("b\n")
    key = certificate.new_private_key()
    request = certificate.certificate_request(
        fs_id=bed.fs_id, region=bed.region, hostname="bed-test", now=datetime.now(timezone.utc),
        access_point=ap_a.id, credentials=bed.credentials.issue("ap-test"),
    )
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(certificate.certificate_pem(certificate.build_certificate(key, request)))
    key_path.write_bytes(certificate.private_key_pem(key))
    key_path.chmod(0o600)
    port = TUNNEL_PORT + 1
    pid = _start_stunnel(bed, _stunnel_config(bed, workdir, port=port, cert=str(cert_path), key=str(key_path)), port)
    try:
        assert _nfs_mount(bed, port, "/mnt/ap-a").rc == 0
        try:
            listing = bed.run(["ls", "-a", "/mnt/ap-a"], timeout=30).stdout.split()
        finally:
            bed.run(["umount", "/mnt/ap-a"], timeout=30)
    finally:
        bed.guest.kill(pid)
    assert "only-in-a" in listing
    assert "only-in-b" not in listing and "ap-b" not in listing
    events = [e for e in bed.endpoint.connection_events() if e.get("access_point") == ap_a.id]
    assert events and events[-1]["event"] == "accepted"


def test_a_stopped_bed_leaves_no_process(tmp_path):
    bed = Bed(tmp_path / "bed")
    bed.start()
    started = procs.tagged_processes(bed.tag)
    names = {p.name() for p in started}
    assert {"linux.uml", "vde_switch", "slirpvde", "ganesha.nfsd"} <= names, names
    assert len(started) > 6
    bed.stop()
    assert procs.tagged_processes(bed.tag) == []
