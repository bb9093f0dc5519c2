"""A shared stunnel process (efsplug.tunnelhost) with real stunnel and real TLS, no kernel.

Sections come and go by SIGHUP; data keeps flowing on a connection made before a
reload; a section stunnel refuses is taken out again and the others go on; the process
stops with its last section; after kill -9, ensure() brings every section back in one new
process.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List

import psutil
import pytest

from efsbed.procs import wait_until
from efsplug import tunnelhost
from efsplug.ports import reserve_port
from efsplug.stunnel import render_service
from efsplug.tunnel import TunnelError, listening_on
from test_tunnel import STUNNEL, EchoServer, listen_socket, recv_exactly, server_context, spec_for  # noqa: F401
from test_tunnel import ca, servers  # noqa: F401 - fixtures

PORTS = (43100, 43200)

pytestmark = pytest.mark.skipif(not os.path.exists(STUNNEL) and not __import__("shutil").which(STUNNEL),
                                reason="stunnel is not installed")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tunnelhost.Host]:
    h = tunnelhost.host_for(tmp_path / "state", None, STUNNEL, 8)
    yield h
    found = tunnelhost.running(h)
    if found is not None:  # a failed test: stop exactly the process it started
        os.kill(found.pid, signal.SIGKILL)
        wait_until(lambda: not found.running(), 5, "host stopped")


def section(tmp_path: Path, port: int, server: EchoServer, ca, **over: object) -> Path:
    d = tmp_path / "state" / f"mount-{port}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "stunnel.conf"
    path.write_text(render_service(spec_for(port, server, ca, **over)))
    return path


def ports(n: int, tmp_path: Path) -> List[int]:
    out = []
    for _ in range(n):
        r = reserve_port(tmp_path / "locks", *PORTS)
        out.append(r.port)
        r.release()
    return sorted(set(out)) if len(set(out)) == n else ports(n, tmp_path)


def echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(payload)
        return recv_exactly(c, len(payload))


def serves(port: int, payload: bytes) -> bool:
    """The tunnel echoes payload. A connection that lands in a listener a reload is just
    closing is reset: retried by the caller (wait_until), as the NFS client retries."""
    try:
        return echo(port, payload) == payload
    except (ConnectionResetError, ConnectionRefusedError):
        return False


def stunnels_on(host: tunnelhost.Host) -> List[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(host.config) in (p.info["cmdline"] or [])]


def test_sections_share_one_process_and_come_and_go(tmp_path, ca, servers, host) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    a, b, c = ports(3, tmp_path)
    first = tunnelhost.add(host, a, section(tmp_path, a, server, ca), binary=STUNNEL, netns=None)
    held = socket.create_connection(("127.0.0.1", a), timeout=10)  # a connection made before the reloads
    try:
        held.sendall(b"before")
        assert recv_exactly(held, 6) == b"before"
        second = tunnelhost.add(host, b, section(tmp_path, b, server, ca), binary=STUNNEL, netns=None)
        assert second == first and stunnels_on(host) == [first.pid]
        wait_until(lambda: listening_on(first.pid, a) and listening_on(first.pid, b), 5, "a and b served")
        payload = secrets.token_bytes(64 * 1024)
        assert echo(a, payload) == payload and echo(b, payload) == payload

        # A section stunnel refuses: one line naming why; the others keep serving, and it is gone again.
        with pytest.raises(TunnelError, match="refused the new section: No trusted certificates found; .*Failed to initialize TLS context"):
            tunnelhost.add(host, c, section(tmp_path, c, server, ca, cafile=str(tmp_path / "empty.pem")),
                           binary=STUNNEL, netns=None, ready_timeout=2)
        assert not host.link(c).exists() and not listening_on(first.pid, c)
        wait_until(lambda: listening_on(first.pid, a) and listening_on(first.pid, b), 5, "a and b still served")

        tunnelhost.remove(host, a)
        wait_until(lambda: not listening_on(first.pid, a), 5, "a no longer served")
        assert tunnelhost.running(host) == first
        wait_until(lambda: serves(b, payload), 5, "b served after a's removal")
        held.sendall(b"after")  # reloads rebind listeners; they leave made connections alone
        assert recv_exactly(held, 5) == b"after"

        tunnelhost.remove(host, b)  # the last section: the process stops with it
        assert not first.running() and tunnelhost.running(host) is None
        assert not host.identity_file.exists() and list(host.services.iterdir()) == []
    finally:
        held.close()


def test_kill_9_then_ensure_brings_every_section_back_in_one_process(tmp_path, ca, servers, host) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    a, b = ports(2, tmp_path)
    old = tunnelhost.add(host, a, section(tmp_path, a, server, ca), binary=STUNNEL, netns=None)
    tunnelhost.add(host, b, section(tmp_path, b, server, ca), binary=STUNNEL, netns=None)
    os.kill(old.pid, signal.SIGKILL)
    wait_until(lambda: not old.running(), 5, "killed")
    new_a = tunnelhost.ensure(host, a, host.link(a).resolve(), binary=STUNNEL, netns=None)  # the first to notice starts it
    new_b = tunnelhost.ensure(host, b, host.link(b).resolve(), binary=STUNNEL, netns=None)  # the next finds it listening
    assert new_a == new_b != old and stunnels_on(host) == [new_a.pid]
    payload = secrets.token_bytes(4096)
    assert echo(a, payload) == payload and echo(b, payload) == payload
    tunnelhost.remove(host, a)
    tunnelhost.remove(host, b)
    assert not new_a.running()


def test_a_killed_mounts_leftover_link_is_pruned_and_a_gone_section_is_not_restarted(tmp_path, ca, servers, host) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    a, b = ports(2, tmp_path)
    tunnelhost.add(host, a, section(tmp_path, a, server, ca), binary=STUNNEL, netns=None)
    sec_b = section(tmp_path, b, server, ca)
    identity = tunnelhost.add(host, b, sec_b, binary=STUNNEL, netns=None)
    sec_b.unlink()  # b's mount directory went without its section being taken out
    with pytest.raises(TunnelError, match="is gone"):
        tunnelhost.ensure(host, b, sec_b, binary=STUNNEL, netns=None)
    tunnelhost.remove(host, a)  # prunes b's dangling link; no section left: the process stops
    assert not identity.running() and list(host.services.iterdir()) == []


def test_a_recorded_identity_of_another_process_is_never_signalled(tmp_path, host) -> None:
    host.directory.mkdir(parents=True)
    me = psutil.Process()
    host.identity_file.write_text(
        '{"pid": %d, "create_time": %r, "cmdline": %s}' % (me.pid, me.create_time(), '["stunnel", "/elsewhere.conf"]'))
    assert tunnelhost.running(host) is None  # not started on this host's config: not ours
    host.identity_file.write_text('{"pid": "x"')
    assert tunnelhost.running(host) is None


def test_the_orphan_sweep_removes_a_section_no_record_or_mount_owns(tmp_path, ca, servers, host) -> None:
    """A mount killed after its section was added but before its record was saved."""
    from efsplug import state
    from efsplug.mounttable import KernelMount
    from efsplug.supervisor.orphans import Sweeper

    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    state_dir = tmp_path / "state"
    owned, used, orphan = ports(3, tmp_path)
    stems = {}
    for port, mountpoint in ((owned, "/mnt/owned"), (used, "/mnt/used"), (orphan, "/mnt/orphan")):
        record = state.MountRecord(fs_id="fs-12345678", mountpoint=mountpoint, port=port)
        stem = state.file_name(record)[:-len(state.SUFFIX)]
        (state_dir / stem).mkdir(parents=True)
        (state_dir / stem / "stunnel.conf").write_text(render_service(spec_for(port, server, ca)))
        identity = tunnelhost.add(host, port, state_dir / stem / "stunnel.conf", binary=STUNNEL, netns=None)
        stems[port] = (record, stem)
    state.save(state_dir, replace(stems[owned][0], tunnel=identity, config_file=str(state_dir / stems[owned][1] / "stunnel.conf"),
                                  host_config=str(host.config), version=state.HOSTED_VERSION))
    kernel = [KernelMount(1, "/mnt/used", "nfs4", "127.0.0.1:/", f"rw,port={used},addr=127.0.0.1", used)]

    young = Sweeper(state_dir, min_age=60, interval=30, read_mounts=lambda: kernel)
    due = young.sweep([identity], time.time())
    assert due < time.time() + 61 and sorted(s.port for s in tunnelhost.sections(host, time.time())) == [owned, used, orphan]

    Sweeper(state_dir, min_age=0, interval=30, read_mounts=lambda: kernel).sweep([identity], time.time())
    assert sorted(s.port for s in tunnelhost.sections(host, time.time())) == [owned, used]
    wait_until(lambda: not listening_on(identity.pid, orphan), 5, "the orphan section no longer served")
    wait_until(lambda: listening_on(identity.pid, owned) and listening_on(identity.pid, used), 5, "the others served")
    assert identity.running()


def test_a_restart_leaves_out_another_tunnels_section_stunnel_now_refuses(tmp_path, ca, servers, host) -> None:
    """kill -9, and meanwhile one tunnel's CA file went: the others come back without it."""
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    good, bad = ports(2, tmp_path)
    own_ca = tmp_path / "own-ca.pem"
    own_ca.write_bytes(ca.cert_path.read_bytes())
    old = tunnelhost.add(host, good, section(tmp_path, good, server, ca), binary=STUNNEL, netns=None)
    bad_section = section(tmp_path, bad, server, ca, cafile=str(own_ca))
    tunnelhost.add(host, bad, bad_section, binary=STUNNEL, netns=None)
    own_ca.unlink()
    os.kill(old.pid, signal.SIGKILL)
    wait_until(lambda: not old.running(), 5, "killed")

    with pytest.raises(tunnelhost.SectionRefused, match=f"efs-{bad}") as refused:
        tunnelhost.ensure(host, bad, bad_section, binary=STUNNEL, netns=None)  # its own restart fails alone
    assert bad in refused.value.ports and tunnelhost.running(host) is None and not host.link(bad).exists()
    new = tunnelhost.ensure(host, good, host.link(good).resolve(), binary=STUNNEL, netns=None)
    assert listening_on(new.pid, good) and not host.link(bad).exists()
    payload = secrets.token_bytes(4096)
    assert echo(good, payload) == payload
    with pytest.raises(tunnelhost.SectionRefused):  # and again later: still alone, the others untouched
        tunnelhost.ensure(host, bad, bad_section, binary=STUNNEL, netns=None)
    assert tunnelhost.running(host) == new and not host.link(bad).exists()
    wait_until(lambda: listening_on(new.pid, good), 5, "the good tunnel served after the reload back")


def test_a_new_tunnel_goes_to_another_process_when_a_neighbours_section_breaks_reloads(tmp_path, ca, servers) -> None:
    server = EchoServer(listen_socket(), server_context(ca, tmp_path))
    servers.append(server)
    state_dir = tmp_path / "state"
    first, broken, new = ports(3, tmp_path)
    own_ca = tmp_path / "own-ca.pem"
    own_ca.write_bytes(ca.cert_path.read_bytes())
    started = []
    try:
        host_a, id_a = tunnelhost.place(state_dir, None, STUNNEL, 8, first, section(tmp_path, first, server, ca))
        started.append(id_a)
        host_b, _ = tunnelhost.place(state_dir, None, STUNNEL, 8, broken,
                                     section(tmp_path, broken, server, ca, cafile=str(own_ca)))
        assert host_b == host_a
        own_ca.unlink()  # host_a can no longer reload: stunnel refuses `broken`'s section
        host_c, id_c = tunnelhost.place(state_dir, None, STUNNEL, 8, new, section(tmp_path, new, server, ca))
        started.append(id_c)
        assert host_c != host_a and id_c != id_a
        # The neighbours keep serving (once host_a's reload back to its working sections rebound them).
        wait_until(lambda: listening_on(id_a.pid, first) and listening_on(id_a.pid, broken), 5, "host_a serving")
        payload = secrets.token_bytes(4096)
        assert echo(new, payload) == payload
        wait_until(lambda: serves(first, payload), 5, "first still served")
    finally:
        for identity in started:
            if identity.running():
                os.kill(identity.pid, signal.SIGKILL)

