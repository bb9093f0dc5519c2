"""`mount.efs`: the helper mount(8) runs for `mount -t efs` (and fstab).

Exit statuses follow mount(8): 1 for bad usage, options or config, 32 when the mount
itself fails. Every failure is one line on stderr that names the cause and the fix.
"""

from __future__ import annotations

import sys

from efsplug import __version__, interrupt
from efsplug.errors import EXIT_MOUNT_FAILURE, EfsplugError

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import List, Optional

    from efsplug.logsink import LogSink
    from efsplug.config import Config
    from efsplug.options import MountRequest

PROG = "mount.efs"


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:
        print(f"{PROG} (efsplug) {__version__}")
        return 0
    if "-h" in args or "--help" in args:
        from efsplug.options import USAGE

        print(f"usage: {USAGE}")
        return 0
    from efsplug import handoff

    interrupt.arm()  # from here a signal undoes whatever was made, and mount.efs exits
    try:
        answer = handoff.request_prepare(args)
    except EfsplugError as exc:  # a signal while the resident efsplug works: it undoes what it made
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    if answer is not None:
        return _finish_handed(answer)
    sink: Optional[LogSink] = None
    request: Optional[MountRequest] = None
    try:
        _complete_python()
        # The mount machinery is imported only when a mount is asked for, and mount.efs does it all.
        from efsplug.config import load_config
        from efsplug.mount import Timings, mount_efs
        from efsplug.options import parse_mount_args

        request = parse_mount_args(args)
        loaded = load_config()
        for warning in loaded.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        sink = _start_sink(request, loaded.config)
        timings = Timings()
        interrupt.arm()
        try:
            record = mount_efs(request, loaded.config, timings=timings)
        finally:
            interrupt.disarm()
    except EfsplugError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        _finish_sink(sink, request, f"{exc}", exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, still no traceback full of values
        print(f"{PROG}: internal error ({type(exc).__name__}); rerun with -v and report it", file=sys.stderr)
        _finish_sink(sink, request, f"internal error ({type(exc).__name__})", EXIT_MOUNT_FAILURE)
        return EXIT_MOUNT_FAILURE
    if request.verbose:
        where = f" through 127.0.0.1:{record.port}" if record else ""
        print(f"{PROG}: mounted {request.fs_id}:{request.path} at {request.mountpoint}{where} ({timings.line()})")
    _finish_sink(sink, request, None, 0, port=record.port if record else None)
    _ensure_supervisor(loaded.config, tunnel=record is not None, verbose=request.verbose)
    return 0


def _ensure_supervisor(config: Config, *, tunnel: bool, verbose: bool) -> None:
    """A mount made here, with no resident efsplug: start the supervisor, as efs-utils starts
    its watchdog (efsplug.autostart). The mount stands either way: a failure is a warning."""
    from pathlib import Path

    from efsplug.autostart import ensure_supervisor

    said = ensure_supervisor(Path(config.efsplug.state_dir), tunnel=tunnel, enabled=config.watchdog.enabled)
    if said and said.startswith("warning: "):
        print(f"{PROG}: {said}", file=sys.stderr)
    elif said and verbose:
        print(f"{PROG}: {said}")


def _finish_handed(answer: dict) -> int:
    """A resident efsplug prepared the mount (efsplug.handoff): run mount.nfs4 here, or
    report its error; a failed or interrupted kernel mount releases what it made."""
    for warning in answer.get("warnings") or []:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if not answer.get("ok"):
        print(f"{PROG}: {answer.get('error')}", file=sys.stderr)
        return int(answer.get("exit") or EXIT_MOUNT_FAILURE)
    fields = answer.get("prepared")
    if fields is None:
        return 0  # -f: nothing to mount
    import time

    from efsplug.nfs import NfsMount, finish_mount

    nfs = NfsMount(fields["source"], fields["mountpoint"], fields["options"], netns=fields["netns"],
                   flags=tuple(fields["flags"]), access_point=fields["access_point"],
                   tunnel_log=fields["tunnel_log"], tunnel_service=fields.get("tunnel_service"), target=fields["target"],
                   identity=fields["identity"])
    verbose = bool(fields["verbose"])
    started = time.perf_counter()
    interrupt.arm()
    try:
        finish_mount(nfs, attempts=int(fields["attempts"]), attempt_timeout=float(fields["attempt_timeout"]),
                     verbose=verbose, port=fields["port"])
    except BaseException as exc:
        if fields["record"]:
            _release_handed(fields["record"])
        if isinstance(exc, EfsplugError):
            print(f"{PROG}: {exc}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, Exception):
            print(f"{PROG}: internal error ({type(exc).__name__}); rerun with -v and report it", file=sys.stderr)
            return EXIT_MOUNT_FAILURE
        raise
    finally:
        interrupt.disarm()
    if verbose:
        where = f" through 127.0.0.1:{fields['port']}" if fields["port"] else ""
        took = (time.perf_counter() - started) * 1000
        print(f"{PROG}: mounted {fields['source']} at {fields['mountpoint']}{where} "
              f"({answer.get('timings')} mount.nfs4={took:.1f}ms; prepared by efsplug pid {answer.get('pid')})")
    return 0


def _complete_python() -> None:
    """mount.efs as the RPM installs it starts without site (-S): enough for a mount a
    resident efsplug prepared. Doing the work itself needs the dependencies (botocore,
    cryptography) from the site directories, added here as a normal start adds them."""
    if sys.flags.no_site:
        import site

        site.main()


def _release_handed(name: str) -> None:
    """Undo what the resident efsplug made for a mount that was not made: by the resident
    itself (it started the tunnel, and so collects its exit), else here."""
    from efsplug import handoff

    if handoff.request_release(name):
        return
    _complete_python()
    from pathlib import Path

    from efsplug import state
    from efsplug.config import load_config
    from efsplug.unmount import UnmountError, release

    state_dir = Path(load_config().config.efsplug.state_dir)
    try:
        release(state.load(state_dir / name), state_dir=state_dir, failed_mount=True)
    except (state.StateError, UnmountError):
        pass  # gone already, or kept: the supervisor reaps what is left


def _start_sink(request: MountRequest, config: Config) -> Optional[LogSink]:
    """[cloudwatch-log] enabled: a sink that finds its way (IMDS, botocore) while the mount runs."""
    if not config.cloudwatch_log.enabled or request.fake:
        return None
    try:
        from efsplug.logsink import start_sink

        return start_sink(config, fs_id=request.fs_id, region=request.region, profile=request.awsprofile)
    except Exception as exc:  # never let log shipping change a mount's outcome
        print(f"{PROG}: warning: CloudWatch Logs: not started ({type(exc).__name__})", file=sys.stderr)
        return None


def _finish_sink(sink: Optional[LogSink], request: Optional[MountRequest], error: Optional[str], exit_code: int,
                 port: Optional[int] = None) -> None:
    """The outcome line to CloudWatch Logs, then a bounded wait for delivery; one warning if it failed."""
    if sink is None:
        return
    from efsplug.cloudwatch import mount_failed, mount_succeeded

    try:
        sink.emit(mount_succeeded(request, port) if error is None else mount_failed(request, error, exit_code))
        report = sink.close()
        warning = report.warning()
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        elif request.verbose:
            print(f"{PROG}: {report.summary()}")
    except Exception as exc:  # never let log shipping change a mount's outcome
        print(f"{PROG}: warning: CloudWatch Logs: internal error ({type(exc).__name__})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
