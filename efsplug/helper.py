"""`mount.efs`: the helper mount(8) runs for `mount -t efs` (and fstab).

Exit statuses follow mount(8): 1 for bad usage, options or config, 32 when the mount
itself fails. Every failure is one line on stderr that names the cause and the fix.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from efsplug import __version__
from efsplug.errors import EXIT_MOUNT_FAILURE, EfsplugError
from efsplug.options import USAGE

PROG = "mount.efs"


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:
        print(f"{PROG} (efsplug) {__version__}")
        return 0
    if "-h" in args or "--help" in args:
        print(f"usage: {USAGE}")
        return 0
    # The mount machinery is imported only when a mount is asked for.
    from efsplug.config import load_config
    from efsplug.mount import Timings, mount_efs
    from efsplug.options import parse_mount_args

    try:
        request = parse_mount_args(args)
        loaded = load_config()
        for warning in loaded.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        timings = Timings()
        record = mount_efs(request, loaded.config, timings=timings)
    except EfsplugError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, still no traceback full of values
        print(f"{PROG}: internal error ({type(exc).__name__}); rerun with -v and report it", file=sys.stderr)
        return EXIT_MOUNT_FAILURE
    if request.verbose:
        where = f" through 127.0.0.1:{record.port}" if record else ""
        print(f"{PROG}: mounted {request.fs_id}:{request.path} at {request.mountpoint}{where} ({timings.line()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
