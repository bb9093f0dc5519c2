"""`efsplug status`: the cleanup wait in force, where it came from, and no secret from ecs.config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from efsplug import status
from efsplug.config import parse_config
from efsplug.ecsconfig import parse_ecs_config
from efsplug.supervisor.cleanup import NAMES, CleanupWait, cleanup_wait
from efsplug.supervisor.lock import SupervisorLock

WAIT, JITTER = NAMES
SECRET = "hunter2-registry-token"
PUBLISHED = CleanupWait(5.0, f"{WAIT} in /etc/ecs/ecs.config line 3")
COMPUTED = CleanupWait(10800.0, "the ECS agent's default", notes=("/etc/ecs/ecs.config: line 2 has no '='; ignored",))


def never() -> CleanupWait:
    raise AssertionError("a running supervisor's own value must be shown, not one computed here")


def test_the_running_supervisors_value() -> None:
    assert status.cleanup_lines(PUBLISHED.to_json(), never, running=True) == [
        f"cleanup wait: 5s ({WAIT} in /etc/ecs/ecs.config line 3)"]


def test_computed_when_no_supervisor_runs() -> None:
    # A lock file outlives its holder: what it says is stale once nobody holds it.
    assert status.cleanup_lines(PUBLISHED.to_json(), lambda: COMPUTED, running=False) == [
        "cleanup wait (computed here: no supervisor is running): 3h (the ECS agent's default)",
        "    /etc/ecs/ecs.config: line 2 has no '='; ignored",
    ]


@pytest.mark.parametrize("published", [None, "", "{torn"])
def test_computed_when_the_supervisor_does_not_say(published: Optional[str]) -> None:
    lines = status.cleanup_lines(published, lambda: COMPUTED, running=True)
    assert lines[0] == ("cleanup wait (computed here: the running supervisor does not publish it): "
                        "3h (the ECS agent's default)")


# --- the whole command, in process: files under tmp_path, a lock held here --------------

@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state_dir = tmp_path / "efs"
    (tmp_path / "efs-utils.conf").write_text(f"[efsplug]\nstate_dir = {state_dir}\n")
    (tmp_path / "ecs.config").write_text(
        f"ECS_CLUSTER=prod\nECS_ENGINE_AUTH_DATA={{\"auth\":\"{SECRET}\"}}\n{SECRET}\n{WAIT}=5s\n")
    monkeypatch.setenv("EFSPLUG_CONFIG", str(tmp_path / "efs-utils.conf"))
    monkeypatch.setenv("EFSPLUG_ECS_CONFIG", str(tmp_path / "ecs.config"))
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    yield tmp_path


def run_status(capsys: pytest.CaptureFixture[str]) -> List[str]:
    no_agent = Path(os.environ["EFSPLUG_CONFIG"]).with_name("no-agent.json")
    assert status.run(argparse.Namespace(json=False, agent_state=no_agent)) == 0
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    return captured.out.splitlines()


def test_status_without_a_supervisor_reads_ecs_config(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_status(capsys) == [
        "no efs mounts",
        f"cleanup wait (computed here: no supervisor is running): 5s ({WAIT} in {host / 'ecs.config'} line 4)",
        f"    {host / 'ecs.config'}: line 3 has no '='; ignored",
    ]


def test_status_shows_what_the_running_supervisor_uses(host: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ecs = parse_ecs_config(f"{WAIT}=45s\n{JITTER}=1m\n".encode(), "/srv/ecs.config", NAMES)
    theirs = cleanup_wait(parse_config("").config, {}, ecs, rand=lambda low, high: 30.0)
    lock = SupervisorLock(host / "efs", about=theirs.to_json())
    assert lock.try_acquire()
    try:
        # This process's own settings differ: the supervisor's are the ones in force.
        monkeypatch.setenv(WAIT, "2h")
        assert run_status(capsys) == [
            "no efs mounts",
            f"cleanup wait: 1m15s = 45s ({WAIT} in /srv/ecs.config line 1) "
            f"plus a jitter of 30s of up to 1m ({JITTER} in /srv/ecs.config line 2)",
        ]
    finally:
        lock.close()
    lines = run_status(capsys)
    assert lines[1] == f"cleanup wait (computed here: no supervisor is running): 2h ({WAIT} in the process environment)"


def test_json_output_stays_a_list_of_mounts(host: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.run(argparse.Namespace(json=True, agent_state=host / "no-agent.json")) == 0
    assert capsys.readouterr().out.strip() == "[]"
