"""The supervisor's view of one mount, for `efsplug status` (another process) to read.

Written next to the mount's tunnel config, only when the state changes, atomically.
Holds states and reasons, never credentials.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from efsplug.fsutil import atomic_write

STATUS_FILE = "supervisor.json"


@dataclass(frozen=True)
class MountStatus:
    state: str
    reason: str = ""
    since: str = ""  # ISO 8601, UTC
    supervisor_pid: int = 0


def write_status(mount_dir: Path, status: MountStatus) -> None:
    try:
        atomic_write(Path(mount_dir) / STATUS_FILE, (json.dumps(asdict(status)) + "\n").encode(), 0o600)
    except FileNotFoundError:
        pass  # the mount is being reaped: no directory left to describe it


def read_status(mount_dir: Path) -> Optional[MountStatus]:
    try:
        data = json.loads((Path(mount_dir) / STATUS_FILE).read_text())
        return MountStatus(state=str(data["state"]), reason=str(data.get("reason", "")),
                           since=str(data.get("since", "")), supervisor_pid=int(data.get("supervisor_pid", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
