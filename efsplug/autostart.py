"""mount.efs starts the supervisor, as efs-utils' mount.efs starts amazon-efs-mount-watchdog.

Operators of efs-utils never enable its watchdog: the first TLS mount starts it, and it
renews IAM certificates and restarts dead tunnels from then on. Without the same habit a
host that swapped efs-utils for efsplug would keep its mounts' certificates until they
expire. A running supervisor also serves mount.efs warm (efsplug.handoff), so every later
mount on the host skips most of mount.efs's start-up.

After a mount made through a tunnel, `systemctl start --no-block efsplug-supervisor` runs
only when all of these hold:
- `[mount-watchdog] enabled` (the default), as efs-utils reads it;
- systemd is the init (sd_booted(3): /run/systemd/system exists);
- no supervisor holds `<state_dir>/supervisor.lock`;
- no efsplug agent holds its instance lock: the supervisor unit Conflicts= with the agent's,
  so starting it would stop an agent that runs without its supervisor (--no-supervisor).
--no-block: the job is queued and systemctl returns; mount.efs never waits on the
supervisor's start (at boot, an fstab mount runs inside systemd's own transaction).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional, Sequence

UNIT = "efsplug-supervisor.service"
SYSTEMD_RUNTIME = "/run/systemd/system"
SYSTEMCTL = ("/usr/bin/systemctl", "/bin/systemctl")  # mount(8) may run helpers with a minimal PATH
TIMEOUT = 10.0  # systemctl --no-block only queues a job; past this the bus is stuck
_MAX_REASON = 200


def ensure_supervisor(state_dir: Path, *, tunnel: bool, enabled: bool, agent_state: Optional[Path] = None,
                      systemd_runtime: str = SYSTEMD_RUNTIME, systemctl: Sequence[str] = SYSTEMCTL,
                      timeout: float = TIMEOUT) -> Optional[str]:
    """Start the supervisor if the rules above say so. Returns what mount.efs should print:
    None when nothing was done, else a line starting "started" or "warning: ".

    Cheapest facts first: without a tunnel or systemd, no file is opened or module imported.
    agent_state: the agent's state file (default: the agent's own default).
    """
    if not (tunnel and enabled and os.path.isdir(systemd_runtime)):
        return None
    from efsplug.agent.instancelock import lock_path
    from efsplug.supervisor.lock import LOCK_NAME, lock_held

    if lock_held(Path(state_dir) / LOCK_NAME):
        return None
    if agent_state is None:
        from efsplug.agent.store import DEFAULT_STATE_PATH  # the agent's modules, only on this rare path

        agent_state = DEFAULT_STATE_PATH
    if lock_held(lock_path(agent_state)):
        return None
    return _start(systemctl, timeout)


def _start(candidates: Sequence[str], timeout: float) -> str:
    fix = f"run systemctl enable --now {UNIT} so IAM certificates are renewed and dead tunnels restarted"
    binary = next((path for path in candidates if os.path.exists(path)), None)
    if binary is None:
        return f"warning: cannot start {UNIT}: no systemctl at {' or '.join(candidates)}; {fix}"
    try:
        done = subprocess.run([binary, "start", "--no-block", UNIT], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"warning: cannot start {UNIT}: systemctl did not answer within {timeout:g}s; {fix}"
    except OSError as exc:
        return f"warning: cannot start {UNIT}: {exc.strerror}; {fix}"
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        said = lines[-1][:_MAX_REASON] if lines else f"exit status {done.returncode}"
        return f"warning: cannot start {UNIT}: {said}; {fix}"
    return f"started {UNIT}: no supervisor was running"
