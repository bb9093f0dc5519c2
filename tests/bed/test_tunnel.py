"""The real stunnel client against a real TLS server on 127.0.0.1.

The server is a small threaded Python TLS echo server with a certificate from the bed's
CA for an EFS-like DNS name; it records the TLS version and client certificate of each
connection so the tests can see what stunnel actually sent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from efsbed.ca import BedCA
from efsbed.procs import wait_until
from efsplug import state
from efsplug.ports import PortReservation, port_is_listening, reserve_port
from efsplug.stunnel import TunnelSpec
from efsplug.netns import CLONE_NEWNET, setns_function
from efsplug.tunnel import Tunnel, TunnelError, TunnelIdentity, listening_on

NAME = "fs-0123456789abcdef0.efs.us-east-1.amazonaws.com"
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"
PORT_RANGE = (42049, 43049)  # away from the product's default range other suites use

pytestmark = pytest.mark.skipif(shutil.which(STUNNEL) is None, reason="stunnel is not installed")


# ---------------------------------------------------------------- TLS echo server


@dataclass
class Seen:
    version: str
    client_serial: Optional[int]


class EchoServer:
    """TLS echo on a listening socket; one thread per connection."""

    def __init__(self, listener: socket.socket, context: ssl.SSLContext) -> None:
        self.listener = listener
        self.port = listener.getsockname()[1]
        self.context = context
        self.seen: List[Seen] = []
        self.seen_event = threading.Condition()
        self._conns: List[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(raw)
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            return
        der = tls.getpeercert(binary_form=True)
        serial = x509.load_der_x509_certificate(der).serial_number if der else None
        with self.seen_event:
            self.seen.append(Seen(tls.version() or "", serial))
            self.seen_event.notify_all()
        try:
            while True:
                data = tls.recv(65536)
                if not data:
                    return
                tls.sendall(data)
        except (ssl.SSLError, OSError):
            return
        finally:
            tls.close()

    def stop(self) -> None:
        self._stop = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # close() alone does not wake accept()
        except OSError:
            pass
        self.listener.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._thread.join(5)


def server_context(ca: BedCA, tmp: Path, *, client_cas: Optional[List[Path]] = None,
                   max_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    cert = ca.issue_server([NAME], tmp / "server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_path, cert.key_path)
    if max_version is not None:
        ctx.maximum_version = max_version
    if client_cas:
        ctx.verify_mode = ssl.CERT_REQUIRED
        for p in client_cas:
            ctx.load_verify_locations(cafile=str(p))
    return ctx


def self_signed_client(directory: Path, name: str) -> Tuple[Path, Path, int]:
    """A self-signed client certificate (like EFS's IAM one); returns cert, key, serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=15)).not_valid_after(now + dt.timedelta(hours=3))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert.serial_number


def listen_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def echo_once(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(payload)
        return recv_exactly(c, len(payload))


def recv_exactly(c: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = c.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def ca(tmp_path: Path) -> BedCA:
    return BedCA.create(tmp_path / "ca")


@pytest.fixture
def servers() -> Iterator[List[EchoServer]]:
    started: List[EchoServer] = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def tunnels() -> Iterator[List[Tunnel]]:
    started: List[Tunnel] = []
    yield started
    for t in started:
        t.stop(timeout=5)


@pytest.fixture
def port(tmp_path: Path) -> Iterator[PortReservation]:
    with reserve_port(tmp_path / "locks", *PORT_RANGE) as reservation:
        yield reservation


def spec_for(port: int, server: EchoServer, ca: BedCA, **over: object) -> TunnelSpec:
    values = dict(accept_port=port, connect_host="127.0.0.1", connect_port=server.port,
                  check_host=NAME, verify_level=2, cafile=str(ca.cert_path))
    values.update(over)
    return TunnelSpec(**values)  # type: ignore[arg-type]


def start(spec: TunnelSpec, tmp_path: Path, tunnels: List[Tunnel], **kw: object) -> Tunnel:
    t = Tunnel.start(spec, config_path=tmp_path / f"stunnel-{spec.accept_port}.conf",
                     stunnel_binary=STUNNEL, **kw)  # type: ignore[arg-type]
    tunnels.append(t)
    return t


def processes_running(config_path: Path) -> List[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if str(config_path) in (p.info["cmdline"] or [])]


# ---------------------------------------------------------------- tests


def test_data_flows_with_verified_server_name(tmp_path, ca, servers, tunnels, port) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    tunnel = start(spec_for(port.port, server, ca), tmp_path, tunnels)
    port.release()

    payload = secrets.token_bytes(256 * 1024)
    assert echo_once(port.port, payload) == payload
    assert server.seen[-1].version in ("TLSv1.2", "TLSv1.3")
    config = tmp_path / f"stunnel-{port.port}.conf"
    assert config.stat().st_mode & 0o777 == 0o600
    assert tunnel.alive() and tunnel.listening()
    assert os.getsid(tunnel.pid) == tunnel.pid  # own session: outlives the caller's


def test_tls12_only_server_is_accepted(tmp_path, ca, servers, tunnels, port) -> None:
    # sslVersionMin = TLSv1.2 must still talk to a server that stops at 1.2.
    server = EchoServer(listen_socket(), server_context(ca, tmp_path, max_version=ssl.TLSVersion.TLSv1_2))
    servers.append(server)
    start(spec_for(port.port, server, ca), tmp_path, tunnels)
    assert echo_once(port.port, b"ping") == b"ping"
    assert server.seen[-1].version == "TLSv1.2"


def nothing_comes_back(port: int) -> bool:
    """The tunnel accepted but refused the server: data sent gets no echo (reset or EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        try:
            c.sendall(b"secret")
            return c.recv(100) == b""
        except ConnectionResetError:
            return True


def test_wrong_server_name_is_refused(tmp_path, ca, servers, tunnels, port) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    start(spec_for(port.port, server, ca, check_host="fs-99999999.efs.us-east-1.amazonaws.com"),
          tmp_path, tunnels)
    assert nothing_comes_back(port.port)


def test_untrusted_ca_is_refused(tmp_path, ca, servers, tunnels, port) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    other = BedCA.create(tmp_path / "other-ca", name="foreign CA")
    start(spec_for(port.port, server, other), tmp_path, tunnels)
    assert nothing_comes_back(port.port)


def test_bad_ca_file_fails_fast_and_leaves_nothing(tmp_path, ca, servers, tunnels) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    bad = tmp_path / "bad-ca.pem"
    bad.write_text("this is not a certificate\n")
    locks = tmp_path / "locks"
    reservation = reserve_port(locks, *PORT_RANGE)
    config = tmp_path / "bad.conf"
    began = time.monotonic()
    try:
        with pytest.raises(TunnelError) as err:
            Tunnel.start(spec_for(reservation.port, server, ca, cafile=str(bad)),
                         config_path=config, stunnel_binary=STUNNEL, ready_timeout=30)
    finally:
        reservation.release()
    assert time.monotonic() - began < 5  # fails on stunnel's exit, not on the timeout
    assert "exited with status" in str(err.value)
    assert "No trusted certificates found" in str(err.value)  # stunnel's own reason
    assert not config.exists()
    assert processes_running(config) == []
    assert not port_is_listening(reservation.port)
    assert list(locks.iterdir()) == []  # the reservation is gone too
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []


def test_failure_reason_quoted_from_a_shared_log(tmp_path, ca, servers) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    log = tmp_path / "stunnel.log"
    log.write_text("an older run said something\n")
    with pytest.raises(TunnelError) as err:
        Tunnel.start(spec_for(42999, server, ca, cafile=str(tmp_path / "missing.pem")),
                     config_path=tmp_path / "x.conf", stunnel_binary=STUNNEL, log_path=log)
    assert "older run" not in str(err.value)
    assert "Configuration failed" in str(err.value)
    text = log.read_text()
    assert text.startswith("an older run") and "Configuration failed" in text  # appended


def test_port_taken_by_someone_else_fails(tmp_path, ca, servers) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    squatter = listen_socket()
    try:
        taken = squatter.getsockname()[1]
        with pytest.raises(TunnelError, match="exited with status"):
            Tunnel.start(spec_for(taken, server, ca), config_path=tmp_path / "x.conf",
                         stunnel_binary=STUNNEL)
    finally:
        squatter.close()


def test_missing_binary_and_bad_netns_refused(tmp_path, ca, servers) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    spec = spec_for(42998, server, ca)
    with pytest.raises(TunnelError, match="not found"):
        Tunnel.start(spec, config_path=tmp_path / "x.conf", stunnel_binary="no-such-stunnel")
    with pytest.raises(TunnelError, match="cannot open network namespace"):
        Tunnel.start(spec, config_path=tmp_path / "x.conf", stunnel_binary=STUNNEL,
                     netns=str(tmp_path / "nope"))
    not_a_ns = tmp_path / "plain-file"
    not_a_ns.write_text("")
    with pytest.raises(TunnelError, match="cannot enter network namespace"):
        Tunnel.start(spec, config_path=tmp_path / "x.conf", stunnel_binary=STUNNEL, netns=str(not_a_ns))
    fifo = tmp_path / "a-fifo"  # a record's netns path could become one: opening it must not block
    os.mkfifo(fifo)
    with pytest.raises(TunnelError, match="is not a network namespace"):
        Tunnel.start(spec, config_path=tmp_path / "x.conf", stunnel_binary=STUNNEL, netns=str(fifo))
    assert not (tmp_path / "x.conf").exists()
    assert processes_running(tmp_path / "x.conf") == []


def test_kill_9_is_detected(tmp_path, ca, servers, tunnels, port) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    tunnel = start(spec_for(port.port, server, ca), tmp_path, tunnels)
    identity = tunnel.identity
    os.kill(tunnel.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while tunnel.alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # back-off while the kernel delivers the signal
    assert not tunnel.alive()
    assert Tunnel.from_identity(identity) is None
    tunnel.stop()  # a no-op, not an error


def test_a_tunnel_found_again_by_identity_is_stopped_without_a_zombie(tmp_path, ca, servers, tunnels, port) -> None:
    """The agent's Unmount stops a tunnel its own Mount started, holding only the record's
    identity (no Popen): the exit is awaited on a pidfd and our child's zombie is reaped."""
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    started = start(spec_for(port.port, server, ca), tmp_path, tunnels)
    found = Tunnel.from_identity(started.identity)
    assert found is not None and found._popen is None
    found.stop(timeout=5)
    assert not psutil.pid_exists(started.pid)  # reaped: no zombie left in this process


def test_identity_refuses_a_recycled_pid(tmp_path, ca, servers, tunnels, port) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    tunnel = start(spec_for(port.port, server, ca), tmp_path, tunnels)
    real = tunnel.identity
    assert real.cmdline == (shutil.which(STUNNEL), str(tmp_path / f"stunnel-{port.port}.conf"))

    assert real.start_ticks is not None
    older = dataclasses.replace(real, start_ticks=real.start_ticks - 360000)
    older_record = TunnelIdentity(real.pid, real.create_time - 3600, real.cmdline)  # written before start_ticks
    other_program = dataclasses.replace(real, cmdline=("/usr/bin/stunnel4", "/other.conf"))
    for fake in (older, older_record, other_program):
        assert Tunnel.from_identity(fake) is None
        impostor = Tunnel(fake)
        assert not impostor.alive()
        impostor.stop()  # must not signal the process now holding that pid
        with pytest.raises(TunnelError, match="not running"):
            impostor.reload()
    assert tunnel.alive() and echo_once(port.port, b"still here") == b"still here"

    found = Tunnel.from_identity(real)
    assert found is not None and found.alive()


def test_tunnel_outlives_the_process_that_started_it(tmp_path, ca, servers, port) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    spec = spec_for(port.port, server, ca)
    script = (
        "import json, sys\n"
        "from efsplug.stunnel import TunnelSpec\n"
        "from efsplug import state\n"
        "from efsplug.tunnel import Tunnel\n"
        f"t = Tunnel.start(TunnelSpec(**{spec.__dict__!r}), config_path={str(tmp_path / 'c.conf')!r},"
        f" stunnel_binary={STUNNEL!r})\n"
        "print(json.dumps(state.identity_dict(t.identity)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    identity = state.parse_identity(json.loads(out.stdout))  # as a record carries it between processes
    assert identity is not None
    pid = identity.pid
    found = Tunnel.from_identity(identity)
    try:
        assert found is not None and found.alive()
        assert echo_once(port.port, b"orphaned but working") == b"orphaned but working"
    finally:
        if found is not None:
            found.stop(timeout=5)
        else:
            os.kill(pid, signal.SIGKILL)
    assert Tunnel.from_identity(identity) is None


def test_reload_keeps_established_connections_and_loads_the_new_cert(tmp_path, ca, servers, tunnels, port) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    first_cert, first_key, first_serial = self_signed_client(creds, "first")
    second_cert, second_key, second_serial = self_signed_client(creds, "second")
    server = EchoServer(listen_socket(), server_context(ca, tmp_path, client_cas=[first_cert, second_cert]))
    servers.append(server)
    live_cert, live_key = tmp_path / "client.pem", tmp_path / "client.key"
    shutil.copy(first_cert, live_cert)
    shutil.copy(first_key, live_key)
    log = tmp_path / "stunnel.log"
    tunnel = start(spec_for(port.port, server, ca, cert_file=str(live_cert), key_file=str(live_key)),
                   tmp_path, tunnels, log_path=log)

    established = socket.create_connection(("127.0.0.1", port.port), timeout=10)
    try:
        established.sendall(b"before")
        assert recv_exactly(established, 6) == b"before"
        assert server.seen[-1].client_serial == first_serial

        # Certificate renewal: new files in place, then SIGHUP.
        shutil.copy(second_cert, live_cert)
        shutil.copy(second_key, live_key)
        tunnel.reload()
        wait_until(lambda: log.read_text().count("Configuration successful") >= 2, 10, "stunnel reloaded")

        established.sendall(b"after reload")
        assert recv_exactly(established, 12) == b"after reload"
        assert tunnel.pid == tunnel.identity.pid and tunnel.alive()
        assert echo_once(port.port, b"new") == b"new"
        assert server.seen[-1].client_serial == second_serial
        assert [s.client_serial for s in server.seen] == [first_serial, second_serial]
    finally:
        established.close()


# ---------------------------------------------------------------- network namespace


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    name = f"efsplug-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=10)


def in_netns(name: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Create a socket inside namespace name.

    setns(CLONE_NEWNET) changes only the calling thread, and a socket belongs to the
    namespace of the thread that created it, for its whole life. So a throw-away thread
    enters the namespace, makes the socket and ends; the rest of the process (pytest,
    the server threads) stays in the host namespace and can use the socket normally.
    """
    result: List[object] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns_function()(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[return-value]


def ss_listening(port: int, netns: Optional[str] = None) -> bool:
    argv = ["ss", "-Hltn", f"sport = :{port}"]
    if netns:
        argv = ["ip", "netns", "exec", netns] + argv
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout
    return f":{port}" in out


def test_tunnel_in_a_network_namespace(tmp_path, ca, servers, tunnels, netns) -> None:
    # The server lives inside the namespace too: the tunnel connects to *its* 127.0.0.1.
    server = EchoServer(in_netns(netns, listen_socket), server_context(ca, tmp_path))
    servers.append(server)
    with reserve_port(tmp_path / "locks", *PORT_RANGE) as reservation:
        tunnel = start(spec_for(reservation.port, server, ca), tmp_path, tunnels, netns=netns)
    p = reservation.port

    assert ss_listening(p, netns)
    assert not ss_listening(p)
    assert not listening_on(os.getpid(), p) and tunnel.listening()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p), timeout=5).close()

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", p), timeout=10)

    client = in_netns(netns, connect)
    try:
        client.sendall(b"inside the namespace")
        assert recv_exactly(client, 20) == b"inside the namespace"
    finally:
        client.close()
    tunnel.stop()
    assert not tunnel.alive()


# A threaded process that exits the way stunnel can: on SIGTERM its main thread ends first
# (its /proc entry shows a zombie) while another thread still winds down, then the rest.
LEADER_FIRST = r"""
import ctypes, os, signal, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
release = threading.Event()
def winding_down():
    release.wait()
    os.read(int(sys.argv[1]), 1)  # until the test says the main thread is seen as a zombie
    os._exit(0)
threading.Thread(target=winding_down).start()
signal.signal(signal.SIGTERM, lambda *_: (release.set(), libc.syscall(60, 0)))  # SYS_exit: this thread only
os.write(1, b"ready\n")
signal.pause()
"""


def test_stop_reaps_a_threaded_tunnel_whose_main_thread_ends_first(tmp_path: Path) -> None:
    """Found again from a record (no Popen), a child of ours is reaped only once every thread
    is gone: a zombie main thread is not yet reapable, and nothing would reap it later."""
    go_r, go_w = os.pipe()
    os.set_inheritable(go_r, True)
    out_r, out_w = os.pipe()
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", LEADER_FIRST, str(go_r)], dict(os.environ),
                         file_actions=[(os.POSIX_SPAWN_DUP2, out_w, 1)])
    os.close(out_w)
    try:
        assert os.read(out_r, 16) == b"ready\n"
        tunnel = Tunnel(TunnelIdentity.of(pid))
        stopper = threading.Thread(target=tunnel.stop, kwargs={"timeout": 30})
        stopper.start()
        stat = Path(f"/proc/{pid}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", 10, "the main thread ended")
        assert stopper.is_alive()  # the process still has a thread: not gone yet
        os.write(go_w, b"x")
        stopper.join(30)
        assert not stopper.is_alive()
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped by stop(): no zombie left
    finally:
        for fd in (go_r, go_w, out_r):
            os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
