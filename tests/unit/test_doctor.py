"""efsplug doctor's core: dependency order, outcomes, the NFS NULL call's bytes, the ECS line."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List

import pytest
from hypothesis import given, strategies as st

from efsplug.doctor import checks, rpc
from efsplug.doctor.checks import Check, NotApplicable, Problem
from efsplug.doctor.ecs import EcsChecks
from efsplug.doctor.host import parse_stunnel_version
from efsplug.errors import MountFailure


def ok(found: str = "fine"):
    return lambda: found


def fail(cause: str, fix: str = "do this"):
    def run() -> str:
        raise Problem(cause, fix)
    return run


def not_applicable() -> str:
    raise NotApplicable("no iam option")


def test_a_failed_check_stops_what_needs_it_and_nothing_else() -> None:
    results = checks.run_checks([
        Check("a", "first", ok()),
        Check("b", "second", fail("b is broken")),
        Check("c", "needs b", ok(), needs=("b",)),
        Check("d", "needs c", ok(), needs=("c",)),
        Check("e", "needs a only", ok(), needs=("a",)),
        Check("f", "not for these options", not_applicable),
        Check("g", "needs the one that did not apply", ok("ran"), needs=("f",)),
    ])
    assert [(r.name, r.status, r.detail) for r in results] == [
        ("a", "ok", "fine"), ("b", "FAIL", ""), ("c", "skipped", "not run: b failed"),
        ("d", "skipped", "not run: c was not run"), ("e", "ok", "fine"),
        ("f", "skipped", "does not apply: no iam option"), ("g", "ok", "ran")]
    assert checks.failed(results)


def test_lines_say_status_what_and_for_a_failure_cause_and_fix() -> None:
    results = checks.run_checks([
        Check("port-2049", "the mount target accepts TCP 2049", fail("10.0.0.1 does not answer", "allow TCP 2049")),
        Check("region", "the region", ok("us-east-1")),
        Check("dns", "the name", lambda: (_ for _ in ()).throw(MountFailure("cannot resolve x; check DNS"))),
    ])
    assert [r.line() for r in results] == [
        "FAIL    port-2049: the mount target accepts TCP 2049: 10.0.0.1 does not answer; allow TCP 2049",
        "ok      region: the region (us-east-1)",
        "FAIL    dns: the name: cannot resolve x; check DNS",  # the mount path's own message, whole
    ]
    document = json.loads(checks.as_json(results))
    assert document["ok"] is False and [c["status"] for c in document["checks"]] == ["FAIL", "ok", "FAIL"]
    assert document["checks"][0]["fix"] == "allow TCP 2049"


def test_a_check_that_does_not_answer_is_a_bounded_failure() -> None:
    import threading

    never = threading.Event()
    (result,) = checks.run_checks([Check("imds", "metadata", lambda: str(never.wait(5)), timeout=0.2)])
    never.set()
    assert (result.status, result.cause) == ("FAIL", "no answer within 0.2s")


def test_a_need_that_comes_later_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="needs b, which does not come before it"):
        checks.run_checks([Check("a", "a", ok(), needs=("b",)), Check("b", "b", ok())])


def test_the_null_call_is_what_an_nfs_server_expects() -> None:
    call = rpc.null_call(0x01020304)
    (mark,) = struct.unpack(">I", call[:4])
    assert mark & rpc.LAST_FRAGMENT and (mark & ~rpc.LAST_FRAGMENT) == len(call) - 4
    assert struct.unpack(">IIIIII", call[4:28]) == (0x01020304, rpc.CALL, 2, 100003, 4, 0)


@pytest.mark.parametrize("reply, expected", [
    (struct.pack(">IIIIII", 7, 1, 0, 0, 0, 0), rpc.NullReply(True, "success")),
    (struct.pack(">IIIII", 7, 1, 1, 1, 5), rpc.NullReply(False, "authentication refused")),
    (struct.pack(">IIIIII", 7, 1, 0, 0, 0, 2), rpc.NullReply(False, "accept status 2")),
])
def test_replies_are_read_as_the_server_meant_them(reply: bytes, expected: rpc.NullReply) -> None:
    assert rpc.parse_reply(7, reply) == expected


@given(st.binary(max_size=64))
def test_any_bytes_are_a_reply_or_a_value_error(reply: bytes) -> None:
    try:
        assert isinstance(rpc.parse_reply(7, reply), rpc.NullReply)
    except ValueError:
        pass


@pytest.mark.parametrize("text, version", [
    ("stunnel 5.68 on x86_64-pc-linux-gnu platform\nCompiled with OpenSSL 3.0.9", (5, 68)),
    ("[ ] Initializing inetd mode configuration\nstunnel 4.56 on x86_64-redhat-linux-gnu", (4, 56)),
    ("command not understood", None),
])
def test_the_stunnel_version_is_read_from_what_it_prints(text: str, version) -> None:
    assert parse_stunnel_version(text) == version


@pytest.mark.parametrize("content, problem", [
    (None, None),  # no ecs.config: not an ECS host, the check does not apply
    ('ECS_CLUSTER=web\nECS_VOLUME_PLUGIN_CAPABILITIES=["efsAuth"]\n', None),
    ("ECS_CLUSTER=web\n", "ECS_VOLUME_PLUGIN_CAPABILITIES is not set in"),
    ('ECS_VOLUME_PLUGIN_CAPABILITIES="efsAuth"\n', "line 1 does not list \"efsAuth\""),
    ("ECS_VOLUME_PLUGIN_CAPABILITIES=[]\n", "does not list"),
])
def test_the_efsauth_line_is_read_as_the_ecs_agent_reads_it(tmp_path: Path, content, problem) -> None:
    path = tmp_path / "ecs.config"
    if content is not None:
        path.write_text(content)
    (result, _socket) = checks.run_checks(EcsChecks({"EFSPLUG_ECS_CONFIG": str(path),
                                                     "EFSPLUG_PLUGIN_SOCKET": str(tmp_path / "none.sock")}).checks())
    if content is None:
        assert result.status == "skipped" and "not an ECS container instance" in result.detail
    elif problem is None:
        assert result.status == "ok"
    else:
        assert result.status == "FAIL" and problem in result.cause
        assert result.fix == f'add the line ECS_VOLUME_PLUGIN_CAPABILITIES=["efsAuth"] to {path} and restart ecs'


def test_a_plugin_socket_held_by_another_program_is_named(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "plugin.sock"
    (tmp_path / "ecs.config").write_text("")
    with socket.socket(socket.AF_UNIX) as held:  # this test process: not efsplug
        held.bind(str(path))
        held.listen()
        results: List[checks.Result] = checks.run_checks(EcsChecks({
            "EFSPLUG_ECS_CONFIG": str(tmp_path / "ecs.config"), "EFSPLUG_PLUGIN_SOCKET": str(path)}).checks())
    plugin = results[1]
    assert plugin.status == "FAIL" and "not efsplug: ecs-init's own plugin or its socket unit" in plugin.cause
    assert plugin.fix.startswith("systemctl disable --now amazon-ecs-volume-plugin.socket")


def test_options_without_a_file_system_are_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from efsplug.cli import main

    assert main(["doctor", "-o", "tls"]) == 2
    err = capsys.readouterr().err
    assert err == "efsplug doctor: -o needs a file system: efsplug doctor fs-0123456789abcdef0 -o tls,iam\n"


@pytest.mark.parametrize("options, cause", [
    ("iam", "option 'iam' requires 'tls'; add tls to -o"),
    ("tls,accesspoint=ap-1", "accesspoint"),
    ("tls,region=us-east-1\nx", "region"),
])
def test_bad_options_fail_the_options_check_and_nothing_after_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch, options: str,
                                                                    cause: str) -> None:
    from efsplug.cli import main

    monkeypatch.setenv("EFSPLUG_CONFIG", str(tmp_path / "efs-utils.conf"))
    monkeypatch.setenv("EFSPLUG_ECS_CONFIG", str(tmp_path / "ecs.config"))
    assert main(["doctor", "fs-0123456789abcdef0", "-o", options, "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    by_name = {c["name"]: c for c in document["checks"]}
    assert by_name["options"]["status"] == "FAIL" and cause in by_name["options"]["cause"]
    assert "\n" not in by_name["options"]["cause"]
    after = [c for c in document["checks"] if c["name"] in ("imds", "region", "dns", "port-2049", "nfs")]
    assert after and all(c["status"] == "skipped" and c["detail"].startswith("not run") for c in after)


def host_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str) -> dict:
    from efsplug.doctor.host import HostChecks

    (tmp_path / "efs-utils.conf").write_text(config)
    monkeypatch.setenv("EFSPLUG_CONFIG", str(tmp_path / "efs-utils.conf"))
    return {r.name: r for r in checks.run_checks(HostChecks().checks())}


def test_a_missing_stunnel_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = host_results(tmp_path, monkeypatch, "[efsplug]\nstunnel = efsplug-no-such-stunnel\n")["stunnel"]
    assert (result.status, result.cause) == (
        "FAIL", "stunnel not found; install stunnel (stunnel4 on Debian, stunnel5 on Amazon Linux)")


def test_an_old_stunnel_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / "stunnel"
    old.write_text("#!/bin/sh\necho 'stunnel 4.56 on x86_64-redhat-linux-gnu platform' >&2\n")
    old.chmod(0o755)
    result = host_results(tmp_path, monkeypatch, f"[efsplug]\nstunnel = {old}\n")["stunnel"]
    assert result.status == "FAIL" and result.cause == f"{old} is stunnel 4.56; hostname checks need 5.15 or later"
    assert result.fix == "install stunnel5 (Amazon Linux) or a newer stunnel4 package"


def test_a_state_dir_others_can_write_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "efs"
    state_dir.mkdir(mode=0o777)
    state_dir.chmod(0o777)
    results = host_results(tmp_path, monkeypatch, f"[efsplug]\nstate_dir = {state_dir}\n")
    assert results["state-dir"].status == "FAIL" and "mode 0o777: others could plant tunnel configs there" in \
        results["state-dir"].cause and results["state-dir"].fix == f"chown root:root {state_dir} && chmod 0750 {state_dir}"
    assert results["ports"].detail == "not run: state-dir failed"


def test_an_unreadable_state_record_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = tmp_path / "efs"
    state_dir.mkdir(mode=0o750)
    (state_dir / "fs-12345678.mnt.20049.json").write_text("{not json")
    result = host_results(tmp_path, monkeypatch, f"[efsplug]\nstate_dir = {state_dir}\n")["state-dir"]
    assert result.status == "FAIL" and result.cause.startswith(f"1 unreadable state record(s) in {state_dir}")
