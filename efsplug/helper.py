"""`mount.efs`: the mount helper mount(8) runs for `mount -t efs`."""

from __future__ import annotations

import sys
from typing import List, Optional

from efsplug import __version__

USAGE = "usage: mount.efs <fs-id>[:/path] <mountpoint> [-o <options>] [-f] [-n] [-s] [-v] [-h] [--version]"


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:
        print(f"mount.efs (efsplug) {__version__}")
        return 0
    if "-h" in args or "--help" in args:
        print(USAGE)
        return 0
    print("mount.efs: mounting is not implemented yet in this build", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
