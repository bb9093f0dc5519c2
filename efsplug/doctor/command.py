"""`efsplug doctor [fs-id[:/path]] [-o options] [--json]`: every check that applies, in order.

Without a file system it checks the host (privileges, config, binaries, kernel NFS, state
dir, ports, ECS wiring); with one, also what a mount with those options would go through.
Exit status 1 if any check failed. Secrets never appear: the checks print what the mount
path prints (sources and access key ids, never keys, tokens or signatures).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from efsplug.doctor import checks
from efsplug.doctor.ecs import EcsChecks
from efsplug.doctor.host import HostChecks


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", nargs="?", metavar="fs-id[:/path]", help="the file system a mount would name")
    parser.add_argument("-o", dest="options", default="", metavar="OPTIONS",
                        help="the options mount.efs would get (tls,iam,accesspoint=…)")
    parser.add_argument("--json", action="store_true", help="the results as one JSON document")
    parser.add_argument("--config", type=Path, default=None, help="efs-utils.conf to use (default: as mount.efs)")


def run(args: argparse.Namespace) -> int:
    if args.options and not args.device:
        print("efsplug doctor: -o needs a file system: efsplug doctor fs-0123456789abcdef0 -o tls,iam",
              file=sys.stderr)
        return 2
    host = HostChecks(args.config)
    plan = host.checks() + EcsChecks(os.environ).checks()
    if args.device:
        from efsplug.doctor.target import TargetChecks

        plan += TargetChecks(args.device, args.options, host, os.environ).checks()
    results = checks.run_checks(plan)
    if args.json:
        print(checks.as_json(results))
    else:
        for result in results:
            print(result.line())
        print("all checks passed" if not checks.failed(results) else
              f"{sum(r.status == checks.FAIL for r in results)} check(s) failed")
    return 1 if checks.failed(results) else 0
