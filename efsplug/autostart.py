"""mount.efs starts the supervisor, as efs-utils' mount.efs starts amazon-efs-mount-watchdog.

Operators of efs-utils never enable its watchdog: the first TLS mount starts it, and it
renews IAM certificates and restarts dead tunnels from then on. Without the same habit a
host that swapped efs-utils for efsplug would keep its mounts' certificates until they
expire. A running supervisor also serves mount.efs warm (efsplug.handoff), so every later
mount on the host skips most of mount.efs's start-up.

After a mount made through a tunnel, mount.efs starts efsplug-supervisor only when all of
these hold, cheapest first:
- `[mount-watchdog] enabled` (the default), as efs-utils reads it;
- systemd is the init (sd_booted(3): /run/systemd/system exists);
- no supervisor holds `<state_dir>/supervisor.lock`, and no efsplug agent its instance lock;
- the agent's unit is neither enabled (it will supervise once it runs) nor active.
The agent matters because the supervisor unit Conflicts= with it: starting the supervisor
would stop an agent that runs without its own (--no-supervisor) or has not taken its lock
yet. For the same reason the job is queued with --job-mode=fail: at boot, it can never turn
a queued start of the agent into a stop. --no-block: systemctl returns once the job is
queued, and mount.efs never waits on the supervisor (an fstab mount at boot runs inside
systemd's own transaction).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

UNIT = "efsplug-supervisor.service"
AGENT_UNIT = "amazon-ecs-volume-plugin.service"
TIMEOUT = 10.0  # each systemctl run only asks or queues; past this the bus is stuck
_MAX_REASON = 300  # systemd's transaction errors run to about 200 characters


@dataclass(frozen=True)
class SystemPaths:
    """Where the facts live; tests point them elsewhere (no systemd runs on the test machines)."""

    systemd_runtime: str = "/run/systemd/system"
    systemctl: Tuple[str, ...] = ("/usr/bin/systemctl", "/bin/systemctl")  # mount(8) may give no PATH
    agent_state: Optional[Path] = None  # the agent's state file; None: its own default
    agent_wanted: str = f"/etc/systemd/system/multi-user.target.wants/{AGENT_UNIT}"  # `systemctl enable`d


def ensure_supervisor(state_dir: Path, *, tunnel: bool, enabled: bool, paths: SystemPaths = SystemPaths(),
                      timeout: float = TIMEOUT) -> Optional[str]:
    """Start the supervisor if the rules above say so. Returns what mount.efs should print:
    None when nothing was done, else a line starting "started" or "warning: "."""
    if not (tunnel and enabled and os.path.isdir(paths.systemd_runtime)):
        return None  # no file opened, no module imported: the usual case off systemd, and for plain NFS
    from efsplug.agent.instancelock import lock_path
    from efsplug.supervisor.lock import lock_held, supervised

    if supervised(state_dir):
        return None
    agent_state = paths.agent_state
    if agent_state is None:
        from efsplug.agent.store import DEFAULT_STATE_PATH  # the agent's modules, only on this rare path

        agent_state = DEFAULT_STATE_PATH
    if lock_held(lock_path(agent_state)) or os.path.lexists(paths.agent_wanted):
        return None
    binary = next((path for path in paths.systemctl if os.path.exists(path)), None)
    if binary is None:
        return _warning(f"no systemctl at {' or '.join(paths.systemctl)}")
    try:
        if _systemctl(binary, ["is-active", "--quiet", AGENT_UNIT], timeout)[0] == 0:
            return None
        status, said = _systemctl(binary, ["start", "--no-block", "--job-mode=fail", UNIT], timeout)
    except _Unanswered as exc:
        return _warning(str(exc))
    if status == 0:
        return f"started {UNIT}: no supervisor was running"
    return _warning(said or f"exit status {status}")


class _Unanswered(Exception):
    pass


def _systemctl(binary: str, args: Sequence[str], timeout: float) -> Tuple[int, str]:
    """systemctl's exit status and the last line it wrote to stderr (bounded)."""
    try:
        done = subprocess.run([binary, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _Unanswered(f"systemctl did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise _Unanswered(f"systemctl: {exc.strerror}") from None
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return done.returncode, lines[-1][:_MAX_REASON] if lines else ""


def _warning(cause: str) -> str:
    return (f"warning: cannot start {UNIT}: {cause}; run systemctl enable --now {UNIT} so IAM certificates "
            "are renewed and dead tunnels restarted")
