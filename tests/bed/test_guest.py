"""The user-mode Linux guest: boot, layout, fail-closed network, command channel, hangs, cleanup."""

from __future__ import annotations

import http.server
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from efsbed import procs
from efsbed.guest import Forward, Guest, GuestCommandError, GuestError, GuestHung, GuestResult

pytestmark = pytest.mark.guest

MOUNT_EFS = str(Path(sys.executable).with_name("mount.efs"))
BODY = b"hello from the host\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("share")


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, http_port: int, share: Path) -> Iterator[Guest]:
    tag = procs.new_tag()
    g = Guest(
        tmp_path_factory.mktemp("guest"),
        tag=tag,
        forwards=[Forward("192.0.2.10", 80, http_port)],
        hosts={"fs-12345678.efs.us-east-1.amazonaws.com": "192.0.2.10"},
        shares={"/mnt/share": share},
        sbin={"mount.efs": MOUNT_EFS},
    )
    try:
        g.start()
        yield g
    finally:
        g.stop()
    # The graceful path (agent powers off) must leave nothing behind either.
    assert procs.tagged_processes(tag) == []


def sh(g: Guest, script: str, **kw: object) -> GuestResult:
    return g.run(["sh", "-c", script], **kw)  # type: ignore[arg-type]


def test_boots_the_selected_kernel_with_nfs4(guest: Guest) -> None:
    assert guest.run(["uname", "-r"], check=True).stdout.strip() == guest.kernel.release
    assert "nfs4" in guest.run(["cat", "/proc/filesystems"], check=True).stdout
    links = guest.run(["ls", "/sys/class/net"], check=True).stdout.split()
    assert sorted(links) == sorted(["lo", guest.kernel.iface])
    # Kernels that ask for directory delegations by default are told not to (guest_init.py).
    has_switch = "directory_delegations" in guest.run(["modinfo", "-F", "parm", "nfsv4"], check=True).stdout
    major_minor = tuple(int(x) for x in guest.kernel.release.split(".")[:2])
    assert has_switch == (major_minor >= (6, 19))
    if has_switch:
        assert guest.run(["cat", "/sys/module/nfsv4/parameters/directory_delegations"], check=True).stdout == "N\n"


def test_overlay_mounts_inside_the_guest(guest: Guest) -> None:
    res = sh(guest, """set -e
        mkdir -p /mnt/ov/l /mnt/ov/u /mnt/ov/w /mnt/ov/m
        echo lower > /mnt/ov/l/f
        mount -t overlay overlay -o lowerdir=/mnt/ov/l,upperdir=/mnt/ov/u,workdir=/mnt/ov/w /mnt/ov/m
        echo upper > /mnt/ov/m/f
        cat /mnt/ov/l/f /mnt/ov/u/f
        umount /mnt/ov/m""", check=True)
    assert res.stdout.split() == ["lower", "upper"]


def test_etc_is_writable_without_touching_the_host(guest: Guest) -> None:
    sh(guest, "mkdir -p /etc/amazon/efs && echo '[mount]' > /etc/amazon/efs/efs-utils.conf", check=True)
    assert guest.run(["cat", "/etc/amazon/efs/efs-utils.conf"], check=True).stdout == "[mount]\n"
    assert not Path("/etc/amazon/efs/efs-utils.conf").exists()


def test_share_and_workdir_are_writable_both_ways(guest: Guest, share: Path) -> None:
    (share / "from-host").write_text("h")
    sh(guest, "cat /mnt/share/from-host > /mnt/share/from-guest", check=True)
    assert (share / "from-guest").read_text() == "h"
    (guest.workdir / "input.txt").write_text("w")
    assert guest.run(["cat", str(guest.workdir / "input.txt")], check=True).stdout == "w"


def test_forward_reaches_the_host_by_ip_and_by_name(guest: Guest) -> None:
    for host in ("192.0.2.10", "fs-12345678.efs.us-east-1.amazonaws.com"):
        code = f"import urllib.request as u; print(u.urlopen('http://{host}/', timeout=10).read().decode(), end='')"
        assert guest.run(["python3", "-c", code], check=True).stdout == BODY.decode()


UNREACHABLE = "[Errno 113] No route to host"


def test_network_fails_closed(guest: Guest) -> None:
    # No forward for 192.0.2.99: no route, so the connect fails at once inside the guest.
    code = "import socket; socket.create_connection(('192.0.2.99', 80), timeout=10)"
    res = guest.run(["python3", "-c", code], timeout=30)
    assert res.rc != 0 and UNREACHABLE in res.stderr, res
    # A forwarded address on another port: nothing listens there.
    code = "import socket; socket.create_connection(('192.0.2.10', 81), timeout=10)"
    res = guest.run(["python3", "-c", code], timeout=30)
    assert res.rc != 0 and "ConnectionRefusedError" in res.stderr, res
    # Unknown names do not resolve (nothing answers DNS), and slirp's DNS is not even on-link.
    res = guest.run(["getent", "hosts", "no-such-name.example.com"], timeout=30)
    assert res.rc == 2 and res.stdout == ""
    code = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('10.0.2.3', 53))"
    res = guest.run(["python3", "-c", code], timeout=30)
    assert res.rc != 0 and UNREACHABLE in res.stderr, res
    # Nor does IPv6 leave the link (it is off there).
    res = guest.run(["ip", "-6", "route", "show", "default"], check=True)
    assert res.stdout.strip() == ""


def test_timeout_kills_the_command_group_and_the_guest_keeps_working(guest: Guest) -> None:
    res = sh(guest, "sleep 61 & echo started; sleep 61", timeout=1)
    assert res.timed_out and res.rc == -signal.SIGKILL
    assert res.stdout == "started\n" and 1 <= res.duration < 15
    assert guest.run(["pgrep", "-f", "sleep 61"]).rc == 1  # the background child died too
    assert guest.run(["echo", "still here"], check=True).stdout == "still here\n"


def test_concurrent_runs_from_8_threads(guest: Guest) -> None:
    results: List[object] = [None] * 8

    def one(i: int) -> None:
        try:
            results[i] = sh(guest, "sleep 0.5; echo $N; cat", env={"N": str(i)}, input=f"in{i}".encode())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, res in enumerate(results):
        assert isinstance(res, GuestResult), res
        assert (res.rc, res.stdout, res.timed_out) == (0, f"{i}\nin{i}", False)


def test_mount_efs_from_sbin_runs_in_the_guest(guest: Guest) -> None:
    assert guest.run(["readlink", "/sbin/mount.efs"], check=True).stdout.strip() == MOUNT_EFS
    res = guest.run(["/sbin/mount.efs", "--version"], check=True)
    assert "mount.efs" in res.stdout + res.stderr


def test_spawn_writes_its_log_and_kill_ends_it(guest: Guest) -> None:
    pid = guest.spawn(["sh", "-c", "echo spawned; exec sleep 300"], log="/var/log/bed/spawned.log")
    deadline = time.monotonic() + 20
    while guest.run(["cat", "/var/log/bed/spawned.log"]).stdout != "spawned\n":
        assert time.monotonic() < deadline, "the spawned process never wrote its log"
        time.sleep(0.1)  # polling the guest for a condition, bounded by deadline
    assert guest.run(["kill", "-0", str(pid)]).rc == 0
    assert guest.kill(pid) is True
    deadline = time.monotonic() + 20
    while guest.kill(pid, 0):  # signal 0: is the group still there?
        assert time.monotonic() < deadline, "the spawned process survived SIGTERM"
        time.sleep(0.1)
    assert guest.kill(pid) is False


def test_bad_requests_get_errors_and_the_agent_lives_on(guest: Guest) -> None:
    res = guest.run(["/no/such/program"])
    assert res.rc == 127 and "No such file" in res.stderr
    with pytest.raises(GuestCommandError) as err:
        sh(guest, "echo oops >&2; exit 3", check=True)
    assert err.value.result.rc == 3 and "oops" in str(err.value)
    with pytest.raises(GuestError, match="log must be an absolute"):
        guest.spawn(["true"], log="relative.log")
    with pytest.raises(GuestError, match="pid must be"):
        guest.kill(1)
    with pytest.raises(GuestError, match="argv must be"):
        guest.run([])
    with pytest.raises(GuestError, match="unknown op"):
        guest._request({"op": "bogus"}, 10, "bogus")  # raw protocol: no public call sends this
    guest._channel._sock.sendall(b"not json\n[1, 2]\n")  # type: ignore[union-attr]
    assert guest.run(["echo", "ok"], check=True).stdout == "ok\n"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forwards": [Forward("2001:db8::1", 99999, 1)]}, "ports"),
        ({"forwards": [Forward("192.0.2.1", 0, 1)]}, "ports"),
        ({"forwards": [Forward("not-an-ip", 80, 1)]}, "does not appear to be an IPv4 or IPv6"),
        ({"hosts": {"x": "nope"}}, "does not appear"),
        ({"hosts": {"a b": "192.0.2.1"}}, "bad host name"),
        ({"shares": {"/mnt/x": Path("/no/such/dir")}}, "does not exist"),
        ({"shares": {"relative": Path("/tmp")}}, "must be absolute"),
        ({"sbin": {"mount.efs": "relative/mount.efs"}}, "absolute path"),
        ({"sbin": {"a/b": MOUNT_EFS}}, "absolute path"),
        ({"mem_mb": 16}, "mem_mb"),
    ],
)
def test_bad_configuration_is_refused_before_boot(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Guest(tmp_path, tag=procs.new_tag(), **kwargs)


def test_workdir_with_spaces_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="command line"):
        Guest(tmp_path / "a b", tag=procs.new_tag())


def test_hung_guest_is_powered_off_and_reported(tmp_path: Path) -> None:
    tag = procs.new_tag()
    g = Guest(tmp_path, tag=tag, hang_grace=2.0)
    try:
        g.start()
        assert g.agent_pid is not None
        other: List[BaseException] = []

        def long_command() -> None:
            try:
                g.run(["sleep", "120"], timeout=120)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                other.append(exc)

        waiter = threading.Thread(target=long_command)
        waiter.start()
        started = time.monotonic()
        with pytest.raises(GuestHung):
            # The agent freezes itself while it waits for this command: no answer ever comes.
            g.run(["kill", "-STOP", str(g.agent_pid)], timeout=1)
        assert time.monotonic() - started < 15
        # A command still waiting in another thread learns of it at once, not after 120 s.
        waiter.join(10)
        assert not waiter.is_alive() and len(other) == 1 and isinstance(other[0], GuestHung)
        assert not [p for p in procs.tagged_processes(tag) if p.name() == "linux.uml"]
        with pytest.raises(GuestHung):
            g.run(["true"])
    finally:
        g.stop()
    g.stop()  # idempotent
    assert procs.tagged_processes(tag) == []


def test_failed_setup_powers_off_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    # A share below the read-only root cannot be created: setup fails, the guest powers off.
    tag = procs.new_tag()
    g = Guest(tmp_path, tag=tag, shares={"/usr/share/efsbed-cannot-exist": tmp_path})
    with pytest.raises(GuestError, match="FATAL during sbin and shares"):
        g.start(timeout=60)
    g.stop()
    assert procs.tagged_processes(tag) == []
