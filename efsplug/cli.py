"""`efsplug`: the operator's command. Sub-commands register themselves in COMMANDS."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from efsplug import __version__

# name -> (help line, configure-parser function, run function returning an exit code)
COMMANDS: Dict[str, tuple] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efsplug",
        description="Attach Amazon EFS to hosts and ECS containers over TLS, with IAM and access points.",
    )
    parser.add_argument("--version", action="version", version=f"efsplug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_line, configure, _run) in sorted(COMMANDS.items()):
        configure(sub.add_parser(name, help=help_line, description=help_line))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    run: Callable[[argparse.Namespace], int] = COMMANDS[args.command][2]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
