"""What `efsplug agent` clears at start that a killed agent left beside its state file."""

from __future__ import annotations

import os
from pathlib import Path

from efsplug.agent.command import remove_cut_writes

DEAD = 2 ** 22 + 1  # above the kernel's PID_MAX_LIMIT: no live process has it


def test_a_cut_state_write_is_removed_and_nothing_else(tmp_path: Path) -> None:
    state = tmp_path / "efsplug-volumes.json"
    state.write_text("{}")
    cut = tmp_path / f".efsplug-volumes.json.{DEAD}.0a1b2c3d.tmp"  # a dead writer's copy of the state
    live = tmp_path / f".efsplug-volumes.json.{os.getpid()}.0a1b2c3d.tmp"  # a write in progress
    other = tmp_path / f".ecs_agent_data.json.{DEAD}.0a1b2c3d.tmp"  # /var/lib/ecs/data is the ECS agent's too
    for path in (cut, live, other):
        path.write_text("{}")
    remove_cut_writes(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([state.name, live.name, other.name])


def test_no_state_directory_yet(tmp_path: Path) -> None:
    remove_cut_writes(tmp_path / "missing" / "efsplug-volumes.json")
