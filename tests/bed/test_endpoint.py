"""The emulated EFS mount target, over real sockets: its certificate, as seen by Python's ssl
and by the host's stunnel client, and its IAM admission with product-built certificates."""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, List, Optional

import psutil
import pytest

from efsbed import iam, procs
from efsbed.aws import MotoServer, client
from efsbed.ca import BedCA
from efsbed.credentials import BedCredentials
from efsbed.dynamic_exports import ACCESS_POINT_NOT_FOUND, OTHER_FILE_SYSTEM, ROOT_MISSING
from efsbed.endpoint import EfsEndpoint
from efsbed.ganesha import AllSquash, Ganesha, ganesha_config
from efsplug import certificate
from efsplug.sigv4 import AwsCredentials

FS_ID = "fs-1234abcd"
REGION = "us-east-1"
AP = "fsap-0123456789abcdef0"
FS_NAME = f"{FS_ID}.efs.{REGION}.amazonaws.com"
AZ_NAME = f"us-east-1a.{FS_NAME}"


# --- fixtures ----------------------------------------------------------------------

class EchoBackend:
    """Stands in for ganesha: echoes, and counts connections and bytes it received."""

    HANG_UP = b"hang up\n"  # echoed, then the backend closes the connection

    def __init__(self) -> None:
        backend = self
        self.connections = 0
        self.closed = 0
        self.received = 0
        self._lock = threading.Lock()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with backend._lock:
                    backend.connections += 1
                try:
                    while True:
                        data = self.request.recv(65536)
                        if not data:
                            return
                        with backend._lock:
                            backend.received += len(data)
                        self.request.sendall(data)
                        if data == EchoBackend.HANG_UP:
                            return
                finally:
                    with backend._lock:
                        backend.closed += 1

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("endpoint-bed")


@pytest.fixture(scope="module")
def ca(bed: Path) -> BedCA:
    return BedCA.create(bed / "ca")


@pytest.fixture(scope="module")
def foreign_ca(bed: Path) -> BedCA:
    return BedCA.create(bed / "foreign-ca", name="not the efsbed CA")


@pytest.fixture(scope="module")
def creds(bed: Path) -> BedCredentials:
    return BedCredentials(bed / "credentials.json")


@pytest.fixture(scope="module")
def backends() -> Iterator[dict]:
    made = {"root": EchoBackend(), "ap": EchoBackend()}
    yield made
    for b in made.values():
        b.close()


@pytest.fixture(scope="module")
def endpoint(bed: Path, ca: BedCA, creds: BedCredentials, backends: dict, tag: str) -> Iterator[EfsEndpoint]:
    ep = EfsEndpoint(
        bed / "endpoint", fs_id=FS_ID, region=REGION, ca=ca, credentials=creds, tag=tag,
        routes={None: backends["root"].port, AP: backends["ap"].port},
    )
    with ep:
        yield ep


@pytest.fixture(scope="module")
def client_key():
    return certificate.new_private_key()  # RSA-3072 takes a moment: one key for the module


def write_client_cert(directory: Path, key, *, now: Optional[datetime] = None, fs_id: str = FS_ID,
                      access_point: Optional[str] = None,
                      credentials: Optional[AwsCredentials] = None) -> tuple:
    request = certificate.certificate_request(
        fs_id=fs_id, region=REGION, hostname="efsbed-client", now=now or datetime.now(timezone.utc),
        access_point=access_point, credentials=credentials,
    )
    cert = certificate.build_certificate(key, request)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    cert_path.write_bytes(certificate.certificate_pem(cert))
    key_path.write_bytes(certificate.private_key_pem(key))
    return cert_path, key_path


def tls_client(port: int, *, cafile: Path, server_name: str, client_cert: Optional[tuple] = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cafile))
    if client_cert:
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


def exchange(sock: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send payload; return what comes back before EOF or len(payload) bytes."""
    got = b""
    try:
        sock.sendall(payload)
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ssl.SSLError, ConnectionError):
        pass  # a refusal may surface as a reset instead of a clean EOF
    return got


def new_events(endpoint: EfsEndpoint, before: int, count: int = 1) -> List[dict]:
    return endpoint.wait_for_events(before + count)[before:]


# --- server certificate, Python ssl client -------------------------------------------

@pytest.mark.parametrize("name", [FS_NAME, AZ_NAME])
def test_certificate_verifies_against_bed_ca(endpoint: EfsEndpoint, ca: BedCA, name: str) -> None:
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=name) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        assert exchange(s, b"hello") == b"hello"


def test_client_trusting_foreign_ca_refuses(endpoint: EfsEndpoint, foreign_ca: BedCA) -> None:
    before = len(endpoint.connection_events())
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(endpoint.port, cafile=foreign_ca.cert_path, server_name=FS_NAME)
    (event,) = new_events(endpoint, before)
    assert event["event"] == "refused" and "handshake" in event["reason"]


@pytest.mark.parametrize("name", ["fs-99999999.efs.us-east-1.amazonaws.com", "a.b.fs-1234abcd.efs.us-east-1.amazonaws.com"])
def test_client_checking_wrong_host_name_refuses(endpoint: EfsEndpoint, ca: BedCA, name: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        tls_client(endpoint.port, cafile=ca.cert_path, server_name=name)


# --- server certificate, the host's stunnel client -------------------------------------

class Stunnel:
    def __init__(self, workdir: Path, *, connect_port: int, cafile: Path, check_host: str,
                 client_cert: Optional[tuple], tag: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = procs.free_port()
        self.log = workdir / "stunnel.log"
        lines = [
            "foreground = yes", "pid =", "debug = info", "",
            "[efs]", "client = yes", f"accept = 127.0.0.1:{self.port}",
            f"connect = 127.0.0.1:{connect_port}", "sslVersionMin = TLSv1.2", "renegotiation = no",
            "delay = no", "verify = 2", f"CAfile = {cafile}", f"checkHost = {check_host}",
            "TIMEOUTclose = 0", "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1",
        ]
        if client_cert:
            lines += [f"cert = {client_cert[0]}", f"key = {client_cert[1]}"]
        self.conf = workdir / "stunnel.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.process = procs.start("stunnel", ["stunnel", str(self.conf)], tag=tag, log=self.log)

    def wait_ready(self) -> None:
        # Waiting on the log, not the port: a probe connection would reach the endpoint.
        deadline = time.monotonic() + 10
        delay = 0.005
        while "Configuration successful" not in self.log.read_text(errors="replace"):
            assert self.process.alive(), self.process.log_tail()
            assert time.monotonic() < deadline, self.process.log_tail()
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def exchange(self, payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            got = b""
            try:
                s.sendall(payload)
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except ConnectionError:
                pass
            return got


@pytest.fixture
def stunnel(tmp_path: Path, tag: str) -> Iterator:
    started: List[Stunnel] = []

    def make(**kwargs) -> Stunnel:
        kwargs.setdefault("client_cert", None)
        t = Stunnel(tmp_path / f"stunnel{len(started)}", tag=tag, **kwargs)
        started.append(t)
        t.wait_ready()
        return t

    yield make
    for t in started:
        t.process.stop()


def test_stunnel_accepts_bed_ca_and_right_name(stunnel, endpoint: EfsEndpoint, ca: BedCA) -> None:
    t = stunnel(connect_port=endpoint.port, cafile=ca.cert_path, check_host=AZ_NAME)
    assert t.exchange(b"through stunnel") == b"through stunnel"


def test_stunnel_refuses_foreign_ca(stunnel, endpoint: EfsEndpoint, foreign_ca: BedCA) -> None:
    t = stunnel(connect_port=endpoint.port, cafile=foreign_ca.cert_path, check_host=FS_NAME)
    assert t.exchange(b"must not pass") == b""
    log = t.log.read_text()
    assert "CERT: Pre-verification error: unable to get local issuer certificate" in log
    assert "certificate verify failed" in log


def test_stunnel_refuses_wrong_host_name(stunnel, endpoint: EfsEndpoint, ca: BedCA, backends: dict) -> None:
    received = backends["root"].received
    t = stunnel(connect_port=endpoint.port, cafile=ca.cert_path, check_host="fs-99999999.efs.us-east-1.amazonaws.com")
    assert t.exchange(b"must not pass") == b""
    assert "CERT: Subject checks failed" in t.log.read_text()
    assert backends["root"].received == received


# --- IAM admission -----------------------------------------------------------------------

def test_iam_certificate_is_accepted_and_forwarded(endpoint: EfsEndpoint, ca: BedCA, creds: BedCredentials,
                                                   client_key, backends: dict, tmp_path: Path) -> None:
    issued = creds.issue("good")
    cert = write_client_cert(tmp_path, client_key, access_point=AP, credentials=issued)
    before = len(endpoint.connection_events())
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME, client_cert=cert) as s:
        assert exchange(s, b"nfs over tls") == b"nfs over tls"
    (event,) = new_events(endpoint, before)
    assert event["event"] == "accepted"
    assert event["access_point"] == AP and event["access_key_id"] == issued.access_key_id
    assert event["backend_port"] == backends["ap"].port


def test_certificate_without_iam_routes_by_access_point(endpoint: EfsEndpoint, ca: BedCA, client_key,
                                                        tmp_path: Path) -> None:
    cert = write_client_cert(tmp_path, client_key, access_point=AP)
    before = len(endpoint.connection_events())
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME, client_cert=cert) as s:
        assert exchange(s, b"x") == b"x"
    (event,) = new_events(endpoint, before)
    assert (event["event"], event["access_point"], event["access_key_id"]) == ("accepted", AP, None)


def _wrong_secret(c: AwsCredentials) -> AwsCredentials:
    return AwsCredentials(c.access_key_id, "wrong" + c.secret_access_key[5:], c.session_token, c.expiry)


REFUSALS = {
    "bad signature": (lambda creds: {"credentials": _wrong_secret(creds.issue("bad-sig"))}, iam.SIGNATURE_MISMATCH),
    "expired": (lambda creds: {"credentials": creds.issue("old"),
                               "now": datetime.now(timezone.utc) - timedelta(days=30)}, iam.CERT_EXPIRED),
    "other file system": (lambda creds: {"credentials": creds.issue("other-fs"), "fs_id": "fs-99999999"},
                          iam.WRONG_FILE_SYSTEM),
    "unknown access point": (lambda creds: {"credentials": creds.issue("ap"), "access_point": "fsap-ffffffffffffffff0"},
                             "unknown access point"),
    "unknown key": (lambda creds: {"credentials": AwsCredentials("ASIANOTISSUEDBYBED00", "s" * 40, "t")},
                    iam.UNKNOWN_KEY),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_iam_certificate_is_refused_without_data(case: str, endpoint: EfsEndpoint, ca: BedCA,
                                                     creds: BedCredentials, client_key, backends: dict,
                                                     tmp_path: Path) -> None:
    make, reason = REFUSALS[case]
    cert = write_client_cert(tmp_path, client_key, **make(creds))
    seen = {name: (b.connections, b.received) for name, b in backends.items()}
    before = len(endpoint.connection_events())
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME, client_cert=cert) as s:
        assert exchange(s, b"must not pass") == b""
    (event,) = new_events(endpoint, before)
    assert (event["event"], event["reason"]) == ("refused", reason)
    assert {name: (b.connections, b.received) for name, b in backends.items()} == seen


def test_revoked_key_is_refused(endpoint: EfsEndpoint, ca: BedCA, creds: BedCredentials, client_key,
                                backends: dict, tmp_path: Path) -> None:
    issued = creds.issue("to-revoke")
    cert = write_client_cert(tmp_path, client_key, credentials=issued)
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME, client_cert=cert) as s:
        assert exchange(s, b"before") == b"before"
    creds.revoke(issued.access_key_id)  # the endpoint process notices the file changed
    received = backends["root"].received
    before = len(endpoint.connection_events())
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME, client_cert=cert) as s:
        assert exchange(s, b"after") == b""
    (event,) = new_events(endpoint, before)
    assert (event["event"], event["reason"], event["access_key_id"]) == ("refused", iam.REVOKED_KEY, issued.access_key_id)
    assert backends["root"].received == received


def test_events_never_carry_secrets(endpoint: EfsEndpoint, creds: BedCredentials) -> None:
    text = endpoint.events_path.read_text()
    for key_id, c in creds.active().items():
        assert c.secret_access_key not in text
        assert c.session_token is None or c.session_token not in text


def test_iam_required_refuses_client_without_certificate(endpoint: EfsEndpoint, ca: BedCA, client_key,
                                                         creds: BedCredentials, backends: dict,
                                                         tmp_path: Path) -> None:
    endpoint.reconfigure(iam_required=True)
    try:
        received = backends["root"].received
        before = len(endpoint.connection_events())
        with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME) as s:
            assert exchange(s, b"anonymous") == b""
        no_iam = write_client_cert(tmp_path / "no-iam", client_key)
        with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME, client_cert=no_iam) as s:
            assert exchange(s, b"no iam block") == b""
        good = write_client_cert(tmp_path / "iam", client_key, credentials=creds.issue("required"))
        with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME, client_cert=good) as s:
            assert exchange(s, b"signed") == b"signed"
        events = new_events(endpoint, before, 3)
        assert [(e["event"], e["reason"]) for e in events] == [
            ("refused", "client certificate required"),
            ("refused", "IAM authorization required"),
            ("accepted", ""),
        ]
        assert backends["root"].received == received + len(b"signed")
    finally:
        endpoint.reconfigure(iam_required=False)


def test_stunnel_with_iam_certificate_reaches_backend(stunnel, endpoint: EfsEndpoint, ca: BedCA,
                                                      creds: BedCredentials, client_key, tmp_path: Path) -> None:
    issued = creds.issue("stunnel")
    cert = write_client_cert(tmp_path, client_key, access_point=AP, credentials=issued)
    before = len(endpoint.connection_events())
    t = stunnel(connect_port=endpoint.port, cafile=ca.cert_path, check_host=FS_NAME, client_cert=cert)
    assert t.exchange(b"via stunnel with IAM") == b"via stunnel with IAM"
    (event,) = new_events(endpoint, before)
    assert (event["event"], event["access_point"], event["access_key_id"]) == ("accepted", AP, issued.access_key_id)


# --- load -----------------------------------------------------------------------------

def test_bulk_transfer_both_ways(endpoint: EfsEndpoint, ca: BedCA) -> None:
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME) as s:
        started = time.monotonic()
        got = _send_and_receive(s, payload, deadline=started + 60)
        elapsed = time.monotonic() - started
    assert bytes(got) == payload
    assert len(payload) / elapsed > 10e6, f"only {len(payload) / elapsed / 1e6:.1f} MB/s"


def _send_and_receive(s: ssl.SSLSocket, payload: bytes, *, deadline: float) -> bytes:
    """Write payload while reading the echo, from one thread.

    One OpenSSL connection must not be read and written from two threads at once (a
    sender thread once corrupted the stream under OpenSSL 3.0 and the endpoint closed).
    """
    s.setblocking(False)
    sent, got = 0, bytearray()
    view = memoryview(payload)
    while len(got) < len(payload):
        left = deadline - time.monotonic()
        assert left > 0, f"stalled: sent {sent}, received {len(got)} of {len(payload)}"
        progressed = False
        if sent < len(payload):
            try:
                sent += s.send(view[sent:sent + (1 << 16)])
                progressed = True
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
        try:
            chunk = s.recv(1 << 20)
            assert chunk, f"endpoint closed mid-transfer after {len(got)} bytes"
            got += chunk
            progressed = True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        if not progressed and s.pending() == 0:
            select.select([s], [s] if sent < len(payload) else [], [], min(left, 1.0))
    return bytes(got)


def test_many_concurrent_connections(endpoint: EfsEndpoint, ca: BedCA) -> None:
    socks = [tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME) for _ in range(40)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"conn %03d" % i)
        for i, s in enumerate(socks):
            assert s.recv(100) == b"conn %03d" % i
    finally:
        for s in socks:
            s.close()


def test_client_close_reaches_backend(endpoint: EfsEndpoint, ca: BedCA, backends: dict) -> None:
    backend = backends["root"]
    with tls_client(endpoint.port, cafile=ca.cert_path, server_name=FS_NAME) as s:
        assert exchange(s, b"short") == b"short"
        assert backend.closed < backend.connections  # ours is open
    # Every backend connection, ours included, gets closed once its client has gone.
    deadline = time.monotonic() + 10
    while backend.closed < backend.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.closed == backend.connections


def test_backend_close_reaches_client_as_close_notify(endpoint: EfsEndpoint, ca: BedCA) -> None:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as raw:
        # Without ragged-EOF suppression a TCP close lacking close_notify would raise.
        with ctx.wrap_socket(raw, server_hostname=FS_NAME, suppress_ragged_eofs=False) as s:
            s.sendall(EchoBackend.HANG_UP)
            got = b""
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break
                got += chunk
    assert got == EchoBackend.HANG_UP


# --- the whole host-side chain with a real NFS server ------------------------------------

NFS_CAT = shutil.which("nfs-cat")


@pytest.mark.skipif(NFS_CAT is None, reason="libnfs-utils (nfs-cat) not installed")
def test_nfs_read_through_stunnel_iam_endpoint_and_ganesha(stunnel, bed: Path, ca: BedCA, creds: BedCredentials,
                                                         client_key, tmp_path: Path, tag: str) -> None:
    root_export, ap_export = tmp_path / "export", tmp_path / "export" / "ap-a"
    ap_export.mkdir(parents=True)
    (root_export / "where.txt").write_text("file system root\n")
    (ap_export / "where.txt").write_text("access point root\n")
    with Ganesha(tmp_path / "g-root", root_export, tag=tag) as g_root, \
            Ganesha(tmp_path / "g-ap", ap_export, tag=tag) as g_ap, \
            EfsEndpoint(tmp_path / "ep", fs_id=FS_ID, region=REGION, ca=ca, credentials=creds, tag=tag,
                        routes={None: g_root.port, AP: g_ap.port}, iam_required=True) as ep:
        for access_point, expected in ((None, "file system root\n"), (AP, "access point root\n")):
            cert = write_client_cert(tmp_path / f"c-{access_point}", client_key, access_point=access_point,
                                     credentials=creds.issue(f"nfs-{access_point}"))
            t = stunnel(connect_port=ep.port, cafile=ca.cert_path, check_host=AZ_NAME, client_cert=cert)
            out = subprocess.run(
                [NFS_CAT, f"nfs://127.0.0.1//where.txt?version=4&nfsport={t.port}"],
                capture_output=True, timeout=60,
            )
            assert (out.returncode, out.stdout.decode()) == (0, expected), out.stderr
        assert [e["event"] for e in ep.connection_events()] == ["accepted", "accepted"]


# --- access points created at run time in moto --------------------------------------------

def test_ganesha_config_squashes_every_caller_to_the_access_point_user(tmp_path: Path) -> None:
    squashed = ganesha_config(port=2049, export_dir=tmp_path, recovery_dir=tmp_path / "r", squash=AllSquash(4242, 4343))
    export = [line.strip() for line in squashed[squashed.index("EXPORT {"):].splitlines()]
    assert {"Squash = All_Squash;", "Anonymous_Uid = 4242;", "Anonymous_Gid = 4343;"} <= set(export)
    assert "No_Root_Squash" not in squashed
    plain = ganesha_config(port=2049, export_dir=tmp_path, recovery_dir=tmp_path / "r")
    assert "Squash = No_Root_Squash;" in plain and "Anonymous_" not in plain


@pytest.fixture(scope="module")
def moto(bed: Path, tag: str) -> Iterator[MotoServer]:
    with MotoServer(bed / "moto", tag=tag) as server:
        yield server


@pytest.fixture(scope="module")
def efs(moto: MotoServer):
    return client("efs", moto.endpoint_url, REGION)


def new_file_system(efs) -> str:
    return efs.create_file_system(CreationToken=secrets.token_hex(8))["FileSystemId"]


@pytest.fixture(scope="module")
def moto_fs(efs) -> str:
    return new_file_system(efs)


@pytest.fixture(scope="module")
def runtime_root(bed: Path) -> Path:
    """The file system root on the host, as the bed's export_dir is."""
    root = bed / "runtime-fs"
    root.mkdir()
    return root


def runtime_endpoint(workdir: Path, *, fs_id: str, ca: BedCA, creds: BedCredentials, moto: MotoServer,
                     root_export_dir: Path, root_port: int, tag: str) -> EfsEndpoint:
    return EfsEndpoint(workdir, fs_id=fs_id, region=REGION, ca=ca, credentials=creds, tag=tag,
                       routes={None: root_port}, moto_url=moto.endpoint_url, root_export_dir=root_export_dir)


@pytest.fixture(scope="module")
def dyn_endpoint(bed: Path, ca: BedCA, creds: BedCredentials, moto: MotoServer, moto_fs: str, runtime_root: Path,
                 backends: dict, tag: str) -> Iterator[EfsEndpoint]:
    with runtime_endpoint(bed / "dyn-endpoint", fs_id=moto_fs, ca=ca, creds=creds, moto=moto,
                          root_export_dir=runtime_root, root_port=backends["root"].port, tag=tag) as ep:
        yield ep


def create_access_point(efs, fs_id: str, root: str, *, uid: int = 4242, gid: int = 4242,
                        permissions: Optional[str] = "0750") -> str:
    directory: dict = {"Path": root}
    if permissions is not None:
        directory["CreationInfo"] = {"OwnerUid": uid, "OwnerGid": gid, "Permissions": permissions}
    made = efs.create_access_point(FileSystemId=fs_id, PosixUser={"Uid": uid, "Gid": gid}, RootDirectory=directory)
    return made["AccessPointId"]


def connect_naming(ep: EfsEndpoint, ca: BedCA, key, directory: Path, access_point: str) -> dict:
    """One TLS connection whose certificate names access_point: the endpoint's event for it.

    The endpoint decides before the client sends anything, so the connection stays open
    only until the event is written.
    """
    cert = write_client_cert(directory / access_point, key, fs_id=ep.fs_id, access_point=access_point)
    before = len(ep.connection_events())
    with tls_client(ep.port, cafile=ca.cert_path, server_name=ep.dns_name, client_cert=cert):
        found = new_events(ep, before)
    assert len(found) == 1, found
    return found[0]


def exports_started(ep: EfsEndpoint, access_point: str) -> List[dict]:
    return [e for e in ep.events() if e.get("event") == "export_started" and e.get("access_point") == access_point]


def ganesha_children(ep: EfsEndpoint) -> List[psutil.Process]:
    return [p for p in psutil.Process(ep.pid).children() if p.name() == "ganesha.nfsd"]


def owner_and_mode(path: Path) -> tuple:
    st = path.stat()
    return st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))


def test_access_point_created_at_run_time_gets_its_own_squashing_ganesha(
        dyn_endpoint: EfsEndpoint, efs, moto_fs: str, runtime_root: Path, ca: BedCA, client_key, backends: dict,
        tmp_path: Path) -> None:
    ap = create_access_point(efs, moto_fs, "/dyn/app")
    assert not (runtime_root / "dyn").exists()
    event = connect_naming(dyn_endpoint, ca, client_key, tmp_path, ap)
    assert (event["event"], event["reason"], event["access_point"]) == ("accepted", "", ap)
    port = event["backend_port"]
    assert port != backends["root"].port
    assert [(e["root"], e["uid"], e["gid"], e["backend_port"]) for e in exports_started(dyn_endpoint, ap)] == [
        ("/dyn/app", 4242, 4242, port)]
    procs.wait_for_port(port, timeout=5.0)  # a ganesha listens there
    (child,) = [p for p in ganesha_children(dyn_endpoint) if any(ap in arg for arg in p.cmdline())]
    conf = (Path(child.cmdline()[child.cmdline().index("-f") + 1])).read_text()
    assert f"NFS_Port = {port};" in conf and "Anonymous_Uid = 4242;" in conf
    # Created from CreationInfo, the missing parent too (it did not exist either).
    assert owner_and_mode(runtime_root / "dyn" / "app") == (4242, 4242, "0o750")
    assert owner_and_mode(runtime_root / "dyn") == (4242, 4242, "0o750")

    again = connect_naming(dyn_endpoint, ca, client_key, tmp_path, ap)
    assert (again["event"], again["backend_port"]) == ("accepted", port)
    assert len(exports_started(dyn_endpoint, ap)) == 1  # reused, not started again


def test_two_first_connections_start_one_ganesha(dyn_endpoint: EfsEndpoint, efs, moto_fs: str, ca: BedCA,
                                                 client_key, tmp_path: Path) -> None:
    ap = create_access_point(efs, moto_fs, "/dyn/together")
    cert = write_client_cert(tmp_path, client_key, fs_id=moto_fs, access_point=ap)
    before = len(dyn_endpoint.connection_events())
    ready = threading.Barrier(2)
    release = threading.Event()
    errors: List[BaseException] = []

    def client_thread() -> None:
        try:
            ready.wait(10)
            with tls_client(dyn_endpoint.port, cafile=ca.cert_path, server_name=dyn_endpoint.dns_name,
                            client_cert=cert):
                release.wait(30)  # held open until both were decided
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client_thread) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        events = new_events(dyn_endpoint, before, 2)
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert [(e["event"], e["access_point"]) for e in events] == [("accepted", ap)] * 2
    assert len({e["backend_port"] for e in events}) == 1
    assert len(exports_started(dyn_endpoint, ap)) == 1


def test_root_directory_without_creation_info_must_exist(dyn_endpoint: EfsEndpoint, efs, moto_fs: str,
                                                         runtime_root: Path, ca: BedCA, client_key,
                                                         tmp_path: Path) -> None:
    missing = create_access_point(efs, moto_fs, "/not/there", permissions=None)
    event = connect_naming(dyn_endpoint, ca, client_key, tmp_path, missing)
    assert (event["event"], event["reason"]) == ("refused", ROOT_MISSING)
    assert not (runtime_root / "not").exists() and exports_started(dyn_endpoint, missing) == []

    (runtime_root / "made-by-hand").mkdir()
    existing = create_access_point(efs, moto_fs, "/made-by-hand", permissions=None)
    assert connect_naming(dyn_endpoint, ca, client_key, tmp_path, existing)["event"] == "accepted"
    assert owner_and_mode(runtime_root / "made-by-hand")[:2] == (0, 0)  # left as it was


def test_unknown_access_point_is_refused(dyn_endpoint: EfsEndpoint, ca: BedCA, client_key, tmp_path: Path) -> None:
    unknown = "fsap-" + secrets.token_hex(9)[:17]
    event = connect_naming(dyn_endpoint, ca, client_key, tmp_path, unknown)
    assert (event["event"], event["reason"], event["access_point"]) == ("refused", ACCESS_POINT_NOT_FOUND, unknown)


def test_access_point_deleted_in_moto_is_refused_from_then_on(dyn_endpoint: EfsEndpoint, efs, moto_fs: str,
                                                              ca: BedCA, client_key, tmp_path: Path) -> None:
    ap = create_access_point(efs, moto_fs, "/dyn/short-lived")
    assert connect_naming(dyn_endpoint, ca, client_key, tmp_path, ap)["event"] == "accepted"
    efs.delete_access_point(AccessPointId=ap)
    event = connect_naming(dyn_endpoint, ca, client_key, tmp_path, ap)
    assert (event["event"], event["reason"]) == ("refused", ACCESS_POINT_NOT_FOUND)


def test_access_point_of_another_file_system_is_refused(dyn_endpoint: EfsEndpoint, efs, runtime_root: Path,
                                                        ca: BedCA, client_key, tmp_path: Path) -> None:
    foreign = create_access_point(efs, new_file_system(efs), "/foreign")
    event = connect_naming(dyn_endpoint, ca, client_key, tmp_path, foreign)
    assert (event["event"], event["reason"]) == ("refused", OTHER_FILE_SYSTEM)
    assert not (runtime_root / "foreign").exists() and exports_started(dyn_endpoint, foreign) == []


NFS_CP = shutil.which("nfs-cp")


@pytest.mark.skipif(NFS_CP is None, reason="libnfs-utils (nfs-cp) not installed")
def test_nfs_write_as_root_through_a_runtime_access_point_is_squashed(
        stunnel, dyn_endpoint: EfsEndpoint, efs, moto_fs: str, runtime_root: Path, ca: BedCA, client_key,
        tmp_path: Path) -> None:
    ap = create_access_point(efs, moto_fs, "/nfs/app", uid=4343, gid=4344, permissions="0770")
    cert = write_client_cert(tmp_path / "cert", client_key, fs_id=moto_fs, access_point=ap)
    t = stunnel(connect_port=dyn_endpoint.port, cafile=ca.cert_path, check_host=dyn_endpoint.dns_name,
                client_cert=cert)
    source = tmp_path / "in.txt"
    source.write_text("written as root\n")
    out = subprocess.run([NFS_CP, str(source), f"nfs://127.0.0.1//made.txt?version=4&nfsport={t.port}"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    made = runtime_root / "nfs" / "app" / "made.txt"
    assert made.read_text() == "written as root\n"
    assert owner_and_mode(made)[:2] == (4343, 4344)  # libnfs calls as uid 0: squashed to the PosixUser


@pytest.mark.parametrize("how", ["stop", "sigterm to the endpoint alone", "endpoint killed, then stop"])
def test_runtime_ganeshas_do_not_outlive_the_endpoint(how: str, ca: BedCA, creds: BedCredentials, moto: MotoServer,
                                                      efs, moto_fs: str, client_key, backends: dict,
                                                      tmp_path: Path) -> None:
    own_tag = procs.new_tag()  # only this endpoint and what it starts
    root = tmp_path / "fs"
    root.mkdir()
    ep = runtime_endpoint(tmp_path / "ep", fs_id=moto_fs, ca=ca, creds=creds, moto=moto, root_export_dir=root,
                          root_port=backends["root"].port, tag=own_tag).start()
    try:
        ap = create_access_point(efs, moto_fs, "/hygiene")
        assert connect_naming(ep, ca, client_key, tmp_path, ap)["event"] == "accepted"
        (child,) = ganesha_children(ep)
        assert os.getpgid(child.pid) == ep.pid  # in the endpoint's process group, which procs.stop signals
        if how == "stop":
            ep.stop()
        elif how == "sigterm to the endpoint alone":
            os.kill(ep.pid, signal.SIGTERM)  # not its group: the endpoint must stop its children itself
            procs.wait_until(lambda: not procs.tagged_processes(own_tag), 20.0, "the endpoint and its ganesha to exit")
        else:
            os.kill(ep.pid, signal.SIGKILL)  # no chance to clean up: the group stop must take the child
            procs.wait_until(lambda: not ep.alive(), 10.0, "the endpoint to die")
            assert child.is_running()
            ep.stop()
        assert procs.tagged_processes(own_tag) == []
    finally:
        ep.stop()
        assert procs.tagged_processes(own_tag) == []
