"""The agent's longest clean stop fits in its unit's stop timeout (or systemd SIGKILLs it mid-drain)."""

from __future__ import annotations

import inspect
import re
import socketserver
from pathlib import Path

from efsplug.agent import command
from efsplug.logsink import FLUSH_TIMEOUT
from efsplug.supervisor.runner import Supervisor

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "amazon-ecs-volume-plugin.service"
SYSTEMD_DEFAULT_STOP = 90.0  # DefaultTimeoutStopSec


def _seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s)?", value):
        total += float(number) * {"min": 60.0, "ms": 0.001}.get(unit, 1.0)
    return total


def test_the_units_stop_timeout_covers_the_agents_longest_clean_stop() -> None:
    stop = [_seconds(line.split("=", 1)[1]) for line in UNIT.read_text().splitlines() if line.startswith("TimeoutStopSec=")]
    timeout = stop[-1] if stop else SYSTEMD_DEFAULT_STOP
    # run()'s finally: shutdown() (one accept poll), the drain, the supervisor, the log sink
    poll = inspect.signature(socketserver.BaseServer.serve_forever).parameters["poll_interval"].default
    supervisor = inspect.signature(Supervisor.stop).parameters["timeout"].default
    longest = poll + command.DRAIN_TIMEOUT + supervisor + FLUSH_TIMEOUT
    print(f"longest clean stop {longest:g} s; {UNIT.name} allows {timeout:g} s")
    assert timeout >= longest + 5  # a margin for the interpreter's own exit
