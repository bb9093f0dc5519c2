"""`efsplug`: the operator's command.

Each sub-command lives in its own module exposing `configure(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so
`efsplug status` does not pay for the agent's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

from efsplug import __version__

# name -> (module, one-line help)
SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "agent": ("efsplug.agent.command", "serve the Docker volume plugin for ECS and supervise its mounts"),
    "supervise": ("efsplug.supervisor.command", "supervise mounts made by mount.efs (hosts without the agent)"),
    "status": ("efsplug.status", "show every efs mount, its tunnel and its credentials"),
    "doctor": ("efsplug.doctor.command", "say why a mount fails or would fail, and the fix, without mounting"),
}


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efsplug",
        description="Attach Amazon EFS to hosts and ECS containers over TLS, with IAM and access points.",
    )
    parser.add_argument("--version", action="version", version=f"efsplug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in SUBCOMMANDS.items():
        command_parser = sub.add_parser(name, help=help_line, description=help_line)
        if name == selected:
            importlib.import_module(module).configure(command_parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    selected = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(args_list)
    if not args.command:
        parser.print_help()
        return 0
    return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args)


if __name__ == "__main__":
    sys.exit(main())
