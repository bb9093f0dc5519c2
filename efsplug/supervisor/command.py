"""`efsplug supervise`: the supervisor as a service, for hosts that only use mount.efs.

Runs until SIGTERM/SIGINT. If the agent (or another `efsplug supervise`) already
supervises the same state directory, this one waits and takes over when that one exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from efsplug.config import load_config
from efsplug.errors import EfsplugError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="efs-utils.conf to read (default: $EFSPLUG_CONFIG or "
                        "/etc/amazon/efs/efs-utils.conf)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every decision (DEBUG)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from efsplug import handoff
    from efsplug.mountservice import MountService
    from efsplug.supervisor.runner import Supervisor

    try:
        loaded = load_config(Path(args.config) if args.config else None)
    except EfsplugError as exc:
        print(f"efsplug supervise: {exc}", file=sys.stderr)
        return exc.exit_code
    level = logging.DEBUG if args.verbose else getattr(logging, loaded.config.default.logging_level)
    logging.basicConfig(level=level, format="efsplug supervise: %(created).3f %(levelname)s %(message)s", stream=sys.stderr)
    for warning in loaded.warnings:
        logging.getLogger("efsplug.supervisor").warning("%s", warning)
    if not loaded.config.watchdog.enabled:
        print("efsplug supervise: [mount-watchdog] enabled = false; not supervising", file=sys.stderr)
        return 0
    supervisor = Supervisor(loaded.config)
    mounts = MountService.start_at(Path(handoff.socket_path(os.environ)))  # mount.efs's work, done warm

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stop(timeout=0)  # wakes the loop, which returns

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        supervisor.run_forever()
    except Exception as exc:  # a bug: one line, and a non-zero status so the service restarts
        logging.getLogger("efsplug.supervisor").exception("supervisor failed")
        print(f"efsplug supervise: internal error ({type(exc).__name__})", file=sys.stderr)
        return 1
    finally:
        if mounts is not None:
            mounts.stop()
    return 0
