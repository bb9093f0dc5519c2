"""Port reservation under real concurrency: processes, threads, listeners, crashes."""

from __future__ import annotations

import os
import random
import signal
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import Iterator, List

import pytest

from efsbed import procs
from efsbed.procs import wait_until
from efsplug.ports import PortRangeExhausted, port_is_listening, reserve_port

REPO = Path(__file__).resolve().parents[2]

# Waits for "go" on stdin, reserves, prints the port, holds it until stdin closes.
HOLDER = """
import sys
from pathlib import Path
from efsplug.ports import reserve_port
lock_dir, lower, upper = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.stdin.readline()
try:
    r = reserve_port(lock_dir, lower, upper)
except Exception as e:
    print("error", e, flush=True)
    sys.exit(1)
print("port", r.port, flush=True)
sys.stdin.read()
"""


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_block(n: int) -> int:
    """The first port of n consecutive ports nobody listens on or uses.

    Drawn from below the kernel's ephemeral range (32768+), so an outgoing connection of
    another test cannot take one between the check and the bind; away from the tunnels'
    default 20049+ and the benchmarks' 30999+.
    """
    for _ in range(200):
        base = random.randrange(23000, 30000 - n)
        if all(not port_is_listening(p) and bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no block of {n} free ports found")


def reported(holder: procs.BedProcess) -> List[str]:
    return [line for line in holder.log_tail(5).splitlines() if line.split()[:1] in (["port"], ["error"])]


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[List[procs.BedProcess]]:
    started: List[procs.BedProcess] = []
    yield started
    for h in started:
        h.stop(timeout=5)


def start_holder(tmp_path: Path, holders: List[procs.BedProcess], i: int, lower: int, upper: int) -> procs.BedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    h = procs.start(f"holder-{i}", [sys.executable, "-c", HOLDER, str(tmp_path / "locks"), str(lower), str(upper)],
                    tag=procs.new_tag(), log=tmp_path / f"holder-{i}.log", env=env, keep_stdin_open=True)
    holders.append(h)
    return h


def test_twenty_processes_at_once_get_twenty_distinct_ports(tmp_path: Path, holders) -> None:
    lower = free_block(20)
    group = [start_holder(tmp_path, holders, i, lower, lower + 20) for i in range(20)]
    for h in group:  # release them together: they race for a range with no spare port
        h.popen.stdin.write(b"go\n")
        h.popen.stdin.flush()
    wait_until(lambda: all(reported(h) for h in group), 20, "every holder reported")
    lines = [reported(h)[0] for h in group]
    assert all(line.startswith("port ") for line in lines), lines
    ports = sorted(int(line.split()[1]) for line in lines)
    assert ports == list(range(lower, lower + 20))


def test_threads_never_share_a_port(tmp_path: Path) -> None:
    lower = free_block(16)
    barrier = threading.Barrier(16)
    got: List[int] = []
    held = []
    errors: List[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(10)
            r = reserve_port(tmp_path / "locks", lower, lower + 16)
            held.append(r)
            got.append(r.port)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    try:
        assert errors == []
        assert sorted(got) == list(range(lower, lower + 16))
    finally:
        for r in held:
            r.release()


def test_a_port_someone_listens_on_is_skipped(tmp_path: Path) -> None:
    lower = free_block(2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", lower))
        squatter.listen(1)
        for _ in range(10):  # every random starting point lands on the free one
            with reserve_port(tmp_path / "locks", lower, lower + 2) as r:
                assert r.port == lower + 1


def test_a_listener_on_any_address_is_seen(tmp_path: Path) -> None:
    lower = free_block(1)
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", lower))
        squatter.listen(1)
        with pytest.raises(PortRangeExhausted):
            reserve_port(tmp_path / "locks", lower, lower + 1)


def test_time_wait_leftovers_do_not_block_a_port(tmp_path: Path) -> None:
    # stunnel binds with SO_REUSEADDR, so a connection lingering in TIME_WAIT on the port
    # (left when the tunnel side closed first) must not count as taken. Linux lets a bind
    # share a port with TIME_WAIT only if *both* sockets set SO_REUSEADDR; stunnel's
    # listener and (via `socket = l:SO_REUSEADDR=yes`) its connections do, as here.
    lower = free_block(1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", lower))
    listener.listen(1)
    client = socket.create_connection(("127.0.0.1", lower))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: TIME_WAIT stays on port `lower`
    client.recv(1)
    client.close()
    listener.close()
    with reserve_port(tmp_path / "locks", lower, lower + 1) as r:
        assert r.port == lower


def test_exhaustion_explains_what_was_found(tmp_path: Path) -> None:
    lower = free_block(4)
    locks = tmp_path / "locks"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", lower))
        squatter.listen(1)
        with reserve_port(locks, lower + 1, lower + 2):  # a mount in progress holds this one
            with pytest.raises(PortRangeExhausted) as err:
                reserve_port(locks, lower, lower + 4, exclude=[lower + 2, lower + 3])
    message = str(err.value)
    assert message.startswith(f"no free port in {lower}-{lower + 4}: 1 tunnels are running")
    assert "1 ports are being set up by other mounts" in message
    assert "2 ports are excluded" in message
    assert "widen port_range_upper_bound in efs-utils.conf or unmount unused file systems" in message
    assert (err.value.listening, err.value.reserved, err.value.excluded) == (1, 1, 2)


def test_a_crashed_holder_frees_its_port(tmp_path: Path, holders) -> None:
    lower = free_block(1)
    holder = start_holder(tmp_path, holders, 0, lower, lower + 1)
    holder.popen.stdin.write(b"go\n")
    holder.popen.stdin.flush()
    wait_until(lambda: reported(holder), 20, "the holder reported")
    assert reported(holder) == [f"port {lower}"]
    with pytest.raises(PortRangeExhausted, match="being set up by other mounts"):
        reserve_port(tmp_path / "locks", lower, lower + 1)

    os.killpg(holder.pid, signal.SIGKILL)
    holder.popen.wait(10)
    assert (tmp_path / "locks" / f"port-{lower}.lock").exists()  # debris, but not a lock
    with reserve_port(tmp_path / "locks", lower, lower + 1) as r:
        assert r.port == lower
    assert list((tmp_path / "locks").iterdir()) == []  # release tidies up


def test_release_is_idempotent_and_lock_dir_is_private(tmp_path: Path) -> None:
    lower = free_block(1)
    r = reserve_port(tmp_path / "locks", lower, lower + 1)
    assert r.held
    assert stat.S_IMODE((tmp_path / "locks").stat().st_mode) == 0o700
    r.release()
    r.release()
    assert not r.held
    with reserve_port(tmp_path / "locks", lower, lower + 1) as again:
        assert again.port == lower


@pytest.mark.parametrize("lower, upper", [(0, 10), (100, 100), (200, 100), (60000, 70000)])
def test_invalid_ranges_refused(tmp_path: Path, lower: int, upper: int) -> None:
    with pytest.raises(ValueError, match="invalid port range"):
        reserve_port(tmp_path / "locks", lower, upper)
