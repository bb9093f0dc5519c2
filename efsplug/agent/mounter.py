"""What the plugin does to the kernel: mount (in process, the mount helper's library),
unmount, and ask whether a path is mounted. Protocol tests inject another Mounter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

from efsplug.config import Config, load_config
from efsplug.mount import mount_efs
from efsplug.options import MountRequest
from efsplug.unmount import is_mounted, unmount_efs


class Mounter(Protocol):
    def mount(self, request: MountRequest) -> None:
        """Mount request at request.mountpoint, or raise EfsplugError (nothing left behind)."""

    def unmount(self, mountpoint: str) -> None:
        """Take the mount down with its tunnel and state; raise EfsplugError if it stays."""

    def is_mounted(self, mountpoint: str) -> bool:
        """True if the kernel shows a mount at mountpoint (never touches the server)."""


class EfsMounter:
    """The real thing: efsplug.mount.mount_efs and efsplug.unmount.unmount_efs, in process."""

    def __init__(self, config_path: Optional[Path] = None, unmount_timeout: float = 30.0) -> None:
        self.config_path = config_path
        self.unmount_timeout = unmount_timeout

    def config(self) -> Config:
        # Read per call: an operator's edit of efs-utils.conf applies to the next mount,
        # as it does for mount.efs, without restarting the agent.
        return load_config(self.config_path).config

    def mount(self, request: MountRequest) -> None:
        mount_efs(request, self.config())

    def unmount(self, mountpoint: str) -> None:
        # Not lazy first: a plain umount that finishes is the clean case; unmount_efs falls
        # back to a lazy one when the server cannot answer (the task's netns is gone).
        unmount_efs(mountpoint, state_dir=Path(self.config().efsplug.state_dir), timeout=self.unmount_timeout)

    def is_mounted(self, mountpoint: str) -> bool:
        return is_mounted(mountpoint)
