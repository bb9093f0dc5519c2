"""Volume types other than efs (nfs, nfs4, s3files): checked driver options and the argv of
`mount -t <type> -o <o> <device> <target>`, as the ECS plugin efsplug replaces runs it.

efsplug makes no tunnel and no record for these: the type's own helper (mount.nfs4 from
nfs-utils, mount.s3files from the S3 Files mount helper) does the work, and whatever
processes it starts are its own. Values are checked only so that they reach mount(8) as
the arguments they look like: no control characters, nothing mount could read as an option.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from efsplug.errors import EfsplugError, UsageError, shown

FS_TYPE = "efs"  # the default, efsplug's own mount
OTHER_TYPES = ("nfs", "nfs4", "s3files")
TYPES = (FS_TYPE, *OTHER_TYPES)
MAX_VALUE = 4096  # a device or option string longer than this is a mistake, not a mount
MOUNT = "/bin/mount"  # an absolute path, as umount's: the agent's PATH is systemd's choice
# Where a helper is looked for: mount(8) runs /sbin/mount.<type>; on merged-/usr hosts the
# others are the same directory, elsewhere a helper there is at least named in the fix.
HELPER_DIRS = ("/sbin", "/usr/sbin", "/bin", "/usr/bin")
_PACKAGES = {
    "nfs": "install nfs-utils (nfs-common on Debian)",
    "nfs4": "install nfs-utils (nfs-common on Debian)",
    "s3files": "install the S3 Files mount helper (amazon-efs-utils 3.x ships it) or use type=efs",
}


class HelperMissing(EfsplugError):
    """The type's mount helper is not installed: Create and Mount say which package brings it."""


@dataclass(frozen=True)
class TypedMount:
    """A checked `mount -t fs_type` of device at mountpoint."""

    fs_type: str
    device: str
    options: str  # the `o=` string as given (an s3files one may name a credentials URI: never shown)
    mountpoint: str


def check_type(fs_type: str) -> str:
    if fs_type not in TYPES:
        raise UsageError(f"volume option type={shown(fs_type)} is not supported; use type=efs, nfs, nfs4 or s3files")
    return fs_type


def typed_mount(fs_type: str, device: str, o: str, mountpoint: str = "") -> TypedMount:
    """The checked mount of a non-efs volume; UsageError names the bad value and the fix."""
    check_type(fs_type)
    assert fs_type != FS_TYPE, "type=efs is efsplug's own mount, not a helper's"
    _check_device(fs_type, device)
    _check_options(o)
    return TypedMount(fs_type, device, o, mountpoint)


def _check_device(fs_type: str, device: str) -> None:
    if not device:
        raise UsageError(f"volume option 'device' is missing; add -o device=<what mount -t {fs_type} mounts>, "
                         "e.g. server:/path")
    if len(device) > MAX_VALUE:
        raise UsageError(f"volume option device is {len(device)} characters long, over {MAX_VALUE}; shorten it")
    at = _control_at(device)
    if at is not None:
        raise UsageError(f"volume option device has a control character at position {at + 1}; remove it")
    if device.startswith("-"):
        raise UsageError(f"volume option device={shown(device)} starts with '-', which mount would read as an "
                         "option; give the device itself (server:/path)")


def _check_options(o: str) -> None:
    # The value is never echoed: for s3files it may carry a credentials URI.
    if len(o) > MAX_VALUE:
        raise UsageError(f"volume option o is {len(o)} characters long, over {MAX_VALUE}; shorten it")
    at = _control_at(o)
    if at is not None:
        raise UsageError(f"volume option o has a control character at position {at + 1}; remove it")
    if o.startswith("-"):
        raise UsageError("volume option o starts with '-'; give comma-separated mount options without it")
    if o and any(item == "" for item in o.split(",")):
        raise UsageError("volume option o has an empty item (two commas, or one at an end); remove the extra comma")


def _control_at(text: str) -> Optional[int]:
    """Index of the first C0/C1 control or Unicode line break: it could forge a log line."""
    for i, ch in enumerate(text):
        code = ord(ch)
        if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or ch in "\u2028\u2029":
            return i
    return None


def mount_argv(m: TypedMount, mount: str = MOUNT) -> List[str]:
    """mount(8)'s arguments. No `--` before the device: mount passes the device on to the
    helper, which parses its own arguments, so a leading '-' is refused instead."""
    assert m.mountpoint.startswith("/"), "the plugin gives an absolute mountpoint"
    options = ["-o", m.options] if m.options else []
    return [mount, "-t", m.fs_type, *options, m.device, m.mountpoint]


def find_helper(fs_type: str, dirs: Sequence[str] = HELPER_DIRS) -> Optional[Path]:
    for directory in dirs:
        path = Path(directory) / f"mount.{fs_type}"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def require_helper(fs_type: str, dirs: Sequence[str] = HELPER_DIRS) -> Path:
    """mount.<fs_type>; without it mount(8) would try the kernel directly and fail obscurely."""
    path = find_helper(fs_type, dirs)
    if path is None:
        raise HelperMissing(
            f"type={fs_type} needs the mount.{fs_type} helper, which is not installed (looked in "
            f"{', '.join(dirs)}); {_PACKAGES.get(fs_type, 'install it')}"
        )
    return path
