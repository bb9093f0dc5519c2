"""mount.efs handing its preparation to a resident efsplug (efsplug.mountservice), on the host.

The host kernel has no NFS client, so every mount here fails at mount.nfs4, after the
tunnel started: exactly the point where a handed-off mount must undo what the resident
process made for it. The real stunnel is wrapped to record its pid and parent: a tunnel
whose parent is this test process was started by the service (which runs in it), one
whose parent is mount.efs was started in process. The guest test proves the mount itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from efsbed.bed import MOUNT_EFS
from efsplug import handoff
from efsplug.mountservice import MountService
from test_mount_host import (  # noqa: F401 - fixtures
    Host, ca, host, mount_args, nothing_left, refused, traced_stunnel,
)

TLS = "tls,mounttargetip=127.0.0.1"
NO_NFS = "mount.nfs4 failed: mount.nfs4: No such device; this kernel has no NFS client"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run" / "mount.sock"
    started = MountService.start_at(path)
    assert started is not None
    yield path
    started.stop()
    assert not path.exists()


def tunnels(started: Path) -> List[Tuple[int, int]]:
    return [(int(a), int(b)) for a, b in (line.split() for line in started.read_text().splitlines())]


def test_handed_off_mount_fails_as_in_process_and_leaves_nothing(host: Host, traced_stunnel: Path, service: Path) -> None:
    alone = host.run(mount_args(host, TLS))
    line = refused(alone, 32, NO_NFS)
    nothing_left(host)
    handed = host.run(mount_args(host, TLS), env={handoff.SOCKET_ENV: str(service)})
    assert refused(handed, 32, NO_NFS) == line  # the same one line, whoever prepared the mount
    (first, _), (second, parent) = tunnels(traced_stunnel)
    assert parent == os.getpid()  # started by the service, not by mount.efs
    nothing_left(host)  # the service released its tunnel, record and directory when mount.efs asked
    assert not Path(f"/proc/{second}").exists()  # and, as its parent, reaped it: not even a zombie is left


def test_iam_and_access_point_through_the_service_leave_nothing(host: Host, traced_stunnel: Path, service: Path) -> None:
    (host.root / "home" / ".aws").mkdir()
    (host.root / "home" / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = AKIAEFSBEDHOST000000\naws_secret_access_key = not-a-real-secret\n")
    options = "tls,iam,awsprofile=default,accesspoint=fsap-0123456789abcdef0,mounttargetip=127.0.0.1"
    res = host.run(mount_args(host, options), env={handoff.SOCKET_ENV: str(service)})
    refused(res, 32, NO_NFS)
    assert "not-a-real-secret" not in res.stderr
    assert [parent for _, parent in tunnels(traced_stunnel)] == [os.getpid()]
    nothing_left(host)
    assert (host.state_dir / "privateKey.pem").stat().st_mode & 0o777 == 0o400


@pytest.mark.parametrize("options, message", [
    ("tls,accesspoint=fsap-123,mounttargetip=127.0.0.1", "option 'accesspoint' value 'fsap-123' is invalid"),
    ("tls,iam,awsprofile=nope,mounttargetip=127.0.0.1", "profile 'nope'"),
])
def test_refusals_come_back_as_the_same_one_line(host: Host, service: Path, options: str, message: str) -> None:
    alone = host.run(mount_args(host, options))
    handed = host.run(mount_args(host, options), env={handoff.SOCKET_ENV: str(service)})
    assert handed.returncode == alone.returncode and handed.stderr == alone.stderr
    refused(handed, alone.returncode, message)
    nothing_left(host)


def test_another_mount_namespace_is_served_in_process(host: Host, traced_stunnel: Path, service: Path) -> None:
    argv = ["unshare", "--mount", "--propagation", "private", "env", f"{handoff.SOCKET_ENV}={service}",
            f"EFSPLUG_CONFIG={host.config}", f"HOME={host.root / 'home'}", "AWS_EC2_METADATA_DISABLED=true",
            str(MOUNT_EFS), *mount_args(host, TLS)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    refused(res, 32, NO_NFS)
    assert [parent for _, parent in tunnels(traced_stunnel)] != [os.getpid()]  # mount.efs started its own
    nothing_left(host)


def _garbling_server(path: Path, answer: bytes) -> Tuple[socket.socket, threading.Thread]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("answer", [b"garbage\n", b'{"v": 1, "handled": true, "ok": true}', b""],
                         ids=["not-json", "cut-short", "closed"])
def test_a_broken_resident_process_means_mount_efs_does_it_itself(host: Host, traced_stunnel: Path, tmp_path: Path,
                                                                   answer: bytes) -> None:
    path = tmp_path / "broken.sock"
    listener, thread = _garbling_server(path, answer)
    try:
        res = host.run(mount_args(host, TLS), env={handoff.SOCKET_ENV: str(path)})
    finally:
        listener.close()
        thread.join(5)
    refused(res, 32, NO_NFS)
    assert [parent for _, parent in tunnels(traced_stunnel)] != [os.getpid()]
    nothing_left(host)


# What a handed mount.efs must never import: each costs it milliseconds (bench_mount_host,
# "second mount"), and the C modules under them do the same work.
HEAVY = {"json", "re", "enum", "socket", "subprocess", "signal", "typing", "collections", "contextlib",
         "dataclasses", "pathlib", "threading"}


def test_the_handed_path_imports_only_the_interpreters_c_modules() -> None:
    """In a fresh interpreter started as the RPM starts mount.efs (-sS): every module the
    handed path runs, then a malformed answer decoded, which on Python 3.11 makes the C
    scanner look for json.decoder (efsplug.litejson) and must still be a ValueError."""
    code = (
        "import sys\n"
        "from efsplug import handoff, helper, nfs, spawn, interrupt, litejson\n"
        "loaded = sorted(set(sys.modules) & set(sys.argv[1].split()))\n"
        "try:\n"
        "    handoff.decode(b'{\"ok\": \"\\x01\"}')\n"
        "except handoff.ProtocolError as exc:\n"
        "    print(' '.join(loaded) or 'none', '|', exc)\n"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-sS", "-c", code, " ".join(sorted(HEAVY))], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "none | not a JSON message\n"


def _ask(path: Path, message: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(handoff.encode(message))
        return handoff.read_message(sock, time.monotonic() + 30)


@pytest.mark.parametrize("name", ["../x.json", "sub/x.json", ".x.json", "x.conf", "", "x\0.json", "x" * 300 + ".json"])
def test_a_release_of_anything_but_a_record_name_is_refused(host: Host, service: Path, name: str) -> None:
    outside = host.root / "x.json"
    outside.write_text("{}")
    answer = _ask(service, {"v": handoff.VERSION, "release": name, "env": {"EFSPLUG_CONFIG": str(host.config)},
                            "ns": handoff.namespaces()})
    assert answer == {"v": handoff.VERSION, "handled": False, "why": "not a record's file name"}
    assert outside.exists()


def test_a_release_of_no_such_record_says_why_and_mount_efs_would_do_it_itself(host: Host, service: Path) -> None:
    env = {"EFSPLUG_CONFIG": str(host.config), handoff.SOCKET_ENV: str(service)}
    answer = _ask(service, {"v": handoff.VERSION, "release": "fs-12345678.mnt.20049.json", "env": env,
                            "ns": handoff.namespaces()})
    assert answer["handled"] and answer["released"] is False and "fs-12345678.mnt.20049.json" in answer["why"]
    assert handoff.request_release("fs-12345678.mnt.20049.json", env) is False
    assert handoff.request_release("x.json", {handoff.SOCKET_ENV: str(host.root / "nobody-listens.sock")}) is False
