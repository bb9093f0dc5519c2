"""The endpoint process: a TLS server that checks the client like EFS and relays to ganesha.

One thread per connection, each running a select loop over its two non-blocking sockets:
a pyOpenSSL Connection must not be read and written from two threads at once.

Like a real mount target, port 2049 also takes plain NFS: the first byte of a connection
tells them apart (0x16 opens a TLS handshake record; an ONC RPC record marker starts with
the last-fragment bit, 0x80). Plain NFS goes to the file system root's export unless
IAM is required, which plain NFS cannot satisfy.

Access points outside the static routes are looked up in moto and get their own ganesha
when the endpoint is configured for it (efsbed.dynamic_exports).
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Tuple

from OpenSSL import SSL

from efsbed import iam
from efsbed.credentials import BedCredentials
from efsbed.dynamic_exports import AccessPointLookup, AccessPointRefused, DynamicExports
from efsbed.rpcdeny import deny_over_tls, deny_plain
from efsbed.endpoint import NO_ACCESS_POINT, EndpointConfig

HANDSHAKE_TIMEOUT = 15.0
DENY_TIMEOUT = 30.0  # how long a refused client may keep sending calls to be denied
TLS_HANDSHAKE_RECORD = 0x16
CHUNK = 256 * 1024
BUFFER_LIMIT = 4 * 1024 * 1024  # stop reading a side while this much waits to be written
# OpenSSL's SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER (pyOpenSSL exports no name for it).
MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2


class Refused(Exception):
    pass


class EventLog:
    """One JSON line per event, appended with a single write so lines never interleave."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, **fields: object) -> None:
        fields["time"] = datetime.now(timezone.utc).isoformat()
        line = (json.dumps(fields, sort_keys=True) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)


class Endpoint:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = EndpointConfig.load(config_path)
        self.events = EventLog(Path(self.config.events_path))
        self.credentials = BedCredentials(Path(self.config.credentials_path))
        self.context = self._context()
        self.dynamic = self._dynamic_exports()

    def _dynamic_exports(self) -> Optional[DynamicExports]:
        config = self.config
        if not config.dynamic_access_points:
            return None
        if not (config.root_export_dir and config.dynamic_workdir):
            raise ValueError("moto_url needs root_export_dir and dynamic_workdir")
        return DynamicExports(
            fs_id=config.fs_id, lookup=AccessPointLookup(config.moto_url, config.region),
            root_export_dir=Path(config.root_export_dir), workdir=Path(config.dynamic_workdir),
            report=self.events.write,
        )

    def stop(self) -> None:
        """SIGTERM: the ganesha processes this endpoint started go with it."""
        if self.dynamic is not None:
            self.dynamic.stop_all()

    def _context(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_file(self.config.cert_path)
        ctx.use_privatekey_file(self.config.key_path)
        ctx.check_privatekey()
        # Ask for a client certificate but take any chain: like EFS, trust comes from the
        # SigV4 signature inside it (the TLS handshake still proves the key is held).
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, err, depth, ok: True)
        # Every connection gets a full handshake and its own IAM check. Resumption would
        # also need a session id context (without one OpenSSL fails every resumed
        # handshake with "session id context uninitialized", i.e. every other reconnect).
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
        # Relay retries a send that wanted a write with a fresh bytes copy of its buffer, which
        # OpenSSL refuses unless this mode is set ("bad write retry"). pyOpenSSL >= 23 sets it
        # itself; under 22 (the AL2023 venv) the relay dropped the connection mid-stream.
        ctx.set_mode(MODE_ACCEPT_MOVING_WRITE_BUFFER)
        return ctx

    def reload(self) -> None:
        self.config = EndpointConfig.load(self.config_path)
        self.events.write(event="reloaded", generation=self.config.generation,
                          iam_required=self.config.iam_required)

    # --- admission ---------------------------------------------------------------

    def admit(self, conn: SSL.Connection, record: dict) -> int:
        """The backend port for this client, or Refused(reason); fills record's ids."""
        config = self.config  # one consistent snapshot even if SIGHUP swaps it
        peer = conn.get_peer_certificate()
        if peer is None:
            if config.iam_required:
                raise Refused("client certificate required")
            identity = iam.IamIdentity(access_point=None, access_key_id=None)
        else:
            self.credentials.refresh()
            try:
                identity = iam.verify_client_certificate(
                    peer.to_cryptography(), fs_id=config.fs_id, region=config.region,
                    known=self.credentials.active(), revoked=self.credentials.revoked_ids(),
                    now=datetime.now(timezone.utc),
                )
            except iam.IamRefused as e:
                record.update(access_point=e.access_point, access_key_id=e.access_key_id)
                raise Refused(e.reason) from None
            record.update(access_point=identity.access_point, access_key_id=identity.access_key_id)
            if identity.access_key_id is None and config.iam_required:
                raise Refused("IAM authorization required")
        port = config.routes.get(identity.access_point or NO_ACCESS_POINT)
        if port is None and identity.access_point and self.dynamic is not None:
            try:
                return self.dynamic.route(identity.access_point)
            except AccessPointRefused as e:
                raise Refused(str(e)) from None
        if port is None:
            raise Refused("unknown access point" if identity.access_point else "no route without access point")
        return port

    # --- per connection ------------------------------------------------------------

    def handle(self, raw: socket.socket, peer: Tuple[str, int]) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setblocking(False)
        conn = SSL.Connection(self.context, raw)
        conn.set_accept_state()
        backend: Optional[socket.socket] = None
        record = {"peer": f"{peer[0]}:{peer[1]}", "access_point": None, "access_key_id": None, "transport": "tls"}
        try:
            first = _first_byte(raw)
            if first is None:
                # A port probe (procs.wait_for_port) or a client that gave up: not a refusal.
                self.events.write(event="dropped", reason="closed before the handshake", **record)
                return
            if first != TLS_HANDSHAKE_RECORD:
                record["transport"] = "plain"
                backend = self._plain(raw, record)
                return
            try:
                _handshake(conn, raw)
            except (SSL.Error, OSError, TimeoutError) as e:
                self.events.write(event="refused", reason=f"tls handshake failed: {_brief(e)}", **record)
                return
            try:
                port = self.admit(conn, record)
                try:
                    backend = socket.create_connection(("127.0.0.1", port), timeout=5.0)
                except OSError as e:
                    raise Refused(f"backend unavailable: {e.strerror or e}") from None
            except Refused as e:
                self.events.write(event="refused", reason=str(e), **record)
                deny_over_tls(conn, raw, DENY_TIMEOUT)
                _close_tls(conn, raw)
                return
            self.events.write(event="accepted", reason="", backend_port=port, **record)
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend.setblocking(False)
            Relay(conn, raw, backend).run()
        except Exception as e:  # one broken connection must not take the server down
            self.events.write(event="error", reason=_brief(e), **record)
        finally:
            if backend is not None:
                backend.close()
            _close_gently(raw)

    def _plain(self, raw: socket.socket, record: dict) -> Optional[socket.socket]:
        """Plain NFS: relay to the root export, or refuse when IAM is required; the backend socket."""
        config = self.config
        if config.iam_required:
            self.events.write(event="refused", reason="plain NFS refused: IAM authorization required", **record)
            deny_plain(raw, DENY_TIMEOUT)
            return None
        port = config.routes.get(NO_ACCESS_POINT)
        if port is None:
            self.events.write(event="refused", reason="no route without access point", **record)
            return None
        try:
            backend = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        except OSError as e:
            self.events.write(event="refused", reason=f"backend unavailable: {e.strerror or e}", **record)
            return None
        self.events.write(event="accepted", reason="", backend_port=port, **record)
        backend.settimeout(None)
        backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setblocking(True)
        _relay_plain(raw, backend)
        return backend

    def serve_forever(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.config.port))
        listener.listen(512)
        self.events.write(event="listening", port=self.config.port)
        while True:
            raw, peer = listener.accept()
            threading.Thread(target=self.handle, args=(raw, peer), daemon=True).start()


def _brief(e: BaseException) -> str:
    # OpenSSL error stacks are long tuples; the last reason string says enough.
    if isinstance(e, SSL.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        return str(e.args[0][-1][-1])
    return f"{type(e).__name__}: {e}"[:200]


def _wait(sock: socket.socket, readable: bool, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("handshake timed out")
    r, w, _ = select.select([sock] if readable else [], [] if readable else [sock], [], remaining)
    if not r and not w:
        raise TimeoutError("handshake timed out")


def _first_byte(raw: socket.socket) -> Optional[int]:
    """The client's first byte, left in the socket; None if it closed without sending."""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    try:
        _wait(raw, True, deadline)
        data = raw.recv(1, socket.MSG_PEEK)
    except (OSError, TimeoutError):
        return None
    return data[0] if data else None


def _close_gently(raw: socket.socket, timeout: float = 5.0) -> None:
    """Close with a FIN, never a reset: send EOF, then read and drop what the client still sends.

    close() with unread input makes the kernel answer RST. The guest reaches the endpoint
    through slirp, which aborts when a host peer resets a connection it is writing to
    (SIGPIPE, then an fd_set overflow), taking the whole guest network down; a refused
    client must not be able to do that.
    """
    try:
        raw.setblocking(False)
        raw.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while True:
            _wait(raw, True, deadline)
            if not raw.recv(CHUNK):
                break
    except (OSError, TimeoutError):
        pass  # already reset, or the client never closed: nothing more to be gentle about
    finally:
        raw.close()


def _relay_plain(client: socket.socket, backend: socket.socket) -> None:
    """Copy both ways with one blocking thread per direction (no TLS state to share)."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    _shutdown_write(dst)
                    return
                dst.sendall(data)
        except OSError:
            # One side broke: wake the other direction up too.
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    upstream = threading.Thread(target=pump, args=(client, backend), daemon=True)
    upstream.start()
    pump(backend, client)
    upstream.join()


def _handshake(conn: SSL.Connection, raw: socket.socket) -> None:
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            _wait(raw, True, deadline)
        except SSL.WantWriteError:
            _wait(raw, False, deadline)


def _close_tls(conn: SSL.Connection, raw: socket.socket) -> None:
    """Send close_notify (best effort, bounded) so the client sees a clean refusal."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            conn.shutdown()
            return
        except SSL.WantWriteError:
            _wait(raw, False, deadline)
        except SSL.WantReadError:
            return  # our close_notify is out; not waiting for the client's
        except (SSL.Error, OSError, TimeoutError):
            return


class Relay:
    """Moves bytes both ways until both directions are closed (or one side breaks)."""

    def __init__(self, tls: SSL.Connection, raw: socket.socket, backend: socket.socket) -> None:
        self.tls, self.raw, self.backend = tls, raw, backend
        self.to_backend = bytearray()
        self.to_client = bytearray()
        self.client_eof = False     # client sent close_notify / closed
        self.backend_eof = False    # backend closed its write side
        self.backend_shut = False   # we forwarded the client's EOF to the backend
        self.client_shut = False    # we sent close_notify to the client
        self.tls_read_wants_write = False
        self.tls_write_wants_read = False

    def run(self) -> None:
        while not (self.client_shut and self.backend_shut):
            try:
                progressed = self._step()
            except (SSL.Error, OSError):
                return  # reset or protocol error: the finally of handle() closes both
            if progressed:
                continue
            if self.client_eof and self.backend_eof and not self.to_client and not self.to_backend:
                return
            rlist, wlist = self._interest()
            if not rlist and not wlist:
                return
            select.select(rlist, wlist, [])

    def _interest(self):
        rlist, wlist = [], []
        if not self.client_eof and len(self.to_backend) < BUFFER_LIMIT:
            (wlist if self.tls_read_wants_write else rlist).append(self.raw)
        if self.to_client and not self.client_shut:
            (rlist if self.tls_write_wants_read else wlist).append(self.raw)
        if not self.backend_eof and len(self.to_client) < BUFFER_LIMIT:
            rlist.append(self.backend)
        if self.to_backend:
            wlist.append(self.backend)
        return list(set(rlist)), list(set(wlist))

    def _step(self) -> bool:
        moved = False
        # client -> backend
        while not self.client_eof and len(self.to_backend) < BUFFER_LIMIT:
            try:
                data = self.tls.recv(CHUNK)
                self.tls_read_wants_write = False
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:
                self.tls_read_wants_write = True
                break
            except (SSL.ZeroReturnError, SSL.SysCallError):
                data = b""  # close_notify, or the client just closed the TCP connection
            if not data:
                self.client_eof = True
            self.to_backend += data
            moved = True
        while self.to_backend:
            try:
                n = self.backend.send(self.to_backend)
            except BlockingIOError:
                break
            del self.to_backend[:n]
            moved = True
        if self.client_eof and not self.to_backend and not self.backend_shut:
            _shutdown_write(self.backend)
            self.backend_shut = True
            moved = True
        # backend -> client
        while not self.backend_eof and len(self.to_client) < BUFFER_LIMIT:
            try:
                data = self.backend.recv(CHUNK)
            except BlockingIOError:
                break
            if not data:
                self.backend_eof = True
            self.to_client += data
            moved = True
        while self.to_client and not self.client_shut:
            try:
                n = self.tls.send(bytes(self.to_client[:CHUNK]))
                self.tls_write_wants_read = False
            except SSL.WantWriteError:
                break
            except SSL.WantReadError:
                self.tls_write_wants_read = True
                break
            del self.to_client[:n]
            moved = True
        if self.backend_eof and not self.to_client and not self.client_shut:
            try:
                self.tls.shutdown()
            except (SSL.WantReadError, SSL.WantWriteError):
                pass  # close_notify queued or sent; good enough for a proxy
            self.client_shut = True
            moved = True
        return moved


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise


def serve(config_path: Path) -> int:
    endpoint = Endpoint(config_path)

    def terminate(*_: object) -> None:
        endpoint.stop()
        # Out of accept() in the main thread; the connection threads are daemons.
        raise SystemExit(0)

    signal.signal(signal.SIGHUP, lambda *_: endpoint.reload())
    signal.signal(signal.SIGTERM, terminate)
    endpoint.serve_forever()
    return 0
