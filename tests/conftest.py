"""Session-wide guard: nothing the bed started may outlive the test session."""

from __future__ import annotations

import pytest

from efsbed import procs


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = [p for tag in sorted(procs.STARTED_TAGS) for p in procs.tagged_processes(tag)]
    if not leftovers:
        return
    lines = []
    for p in leftovers:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:120]}")
            p.kill()
        except Exception:  # already gone between the scan and the kill
            continue
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes started by the test bed outlived the session (killed now):\n" + "\n".join(lines)
    if reporter:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
