"""`efsplug agent`: serve the Docker volume plugin until SIGTERM.

Start-up: lock the state file (one agent per state file), load the state (quarantining a
corrupt file), reconcile it with the kernel's mount table, bind the socket (replacing a
stale one), serve. SIGHUP is logged and ignored. Shutdown (SIGTERM/SIGINT):
stop accepting, let requests in progress finish, remove the socket. Never unmounts:
containers keep their volumes across agent restarts and upgrades.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from efsplug import handoff
from efsplug.agent.instancelock import hold_instance_lock
from efsplug.agent.mounter import EfsMounter
from efsplug.agent.plugin import Plugin
from efsplug.agent.reconcile import reconcile
from efsplug.agent.server import AgentServer, RequestLog, bind_socket
from efsplug.sdnotify import notify
from efsplug.agent.store import DEFAULT_STATE_PATH, Store
from efsplug.cloudwatch import AGENT_LOG
from efsplug.logsink import FLUSH_TIMEOUT, LogSink, SinkHandler, start_sink
from efsplug.config import load_config
from efsplug.errors import EfsplugError
from efsplug.fsutil import leftover_temp_files
from efsplug.mounttable import read_mounts
from efsplug.mountservice import MountService
from efsplug.supervisor.runner import Supervisor

PROG = "efsplug agent"
DEFAULT_SOCKET = Path("/run/docker/plugins/amazon-ecs-volume-plugin.sock")
DEFAULT_VOLUMES_ROOT = Path("/var/lib/ecs/volumes")
DRAIN_TIMEOUT = 150.0  # longer than Docker's 2-minute Mount timeout: a mount finishes or undoes itself


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                        help=f"unix socket to serve; its base name is the driver name (default {DEFAULT_SOCKET})")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE_PATH,
                        help=f"the agent's state file (default {DEFAULT_STATE_PATH})")
    parser.add_argument("--volumes-root", type=Path, default=DEFAULT_VOLUMES_ROOT,
                        help=f"where volumes are mounted, one directory each (default {DEFAULT_VOLUMES_ROOT})")
    parser.add_argument("--config", type=Path, default=None,
                        help="efs-utils.conf to use (default /etc/amazon/efs/efs-utils.conf or $EFSPLUG_CONFIG)")
    parser.add_argument("--no-supervisor", action="store_true",
                        help="do not supervise mounts in process (another `efsplug supervise` does)")


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


def build_plugin(args: argparse.Namespace) -> Plugin:
    """The plugin with its state loaded and reconciled with the kernel; nothing is unmounted."""
    hold_instance_lock(args.state)  # before anything is read or bound: one agent per state file
    remove_cut_writes(args.state)
    store = Store(args.state)
    loaded = store.load()
    if loaded.quarantined is not None:
        say(f"state file {args.state} was unusable ({loaded.problem}); moved to {loaded.quarantined}, starting empty")
    result = reconcile(loaded.volumes, read_mounts(), args.volumes_root)
    for note in result.notes:
        say(note)
    if result.changed or loaded.quarantined is not None:
        store.save(result.volumes, loaded.provisioned_on)
    plugin = Plugin(store, args.volumes_root, mounter=EfsMounter(args.config), initial=result.volumes,
                    provisioned_on=loaded.provisioned_on)
    for note in plugin.release_leftovers():
        say(note)
    return plugin


def remove_cut_writes(state_path: Path) -> None:
    """A state write cut by a crash leaves its temp file: a copy of the state, credentials
    URIs included, that nothing would ever read or remove. Only the state file's own."""
    prefix = f".{state_path.name}."
    try:
        leftovers = leftover_temp_files(state_path.parent)
    except FileNotFoundError:
        return
    for path in leftovers:
        if path.name.startswith(prefix):
            path.unlink(missing_ok=True)


# ---- SUPERVISOR ------------------------------------------------------------------------
# The supervisor (efsplug/supervisor/) keeps tunnels alive, renews IAM certificates and
# reaps what is gone; in process, it asks the plugin how many Docker references a
# mountpoint has (a referenced volume is never reaped) and is told when they change.
# With [mount-watchdog] enabled = false, or --no-supervisor, nothing is started.
def start_supervisor(args: argparse.Namespace, plugin: Plugin, sink: Optional[LogSink] = None,
                     on_failure: Optional[Callable[[], None]] = None) -> Optional["Supervisor"]:
    if args.no_supervisor:
        return None
    loaded = load_config(args.config)
    if not loaded.config.watchdog.enabled:
        say("[mount-watchdog] enabled = false: mounts are not supervised")
        return None
    logging.basicConfig(level=getattr(logging, loaded.config.default.logging_level),
                        format="efsplug agent: supervisor %(levelname)s %(message)s", stream=sys.stderr)
    if sink is not None:  # the supervisor's actions go to CloudWatch Logs too
        logging.getLogger("efsplug.supervisor").addHandler(SinkHandler(sink))
    # Should its thread die, the agent must not serve on unsupervised: on_failure ends run().
    supervisor = Supervisor(loaded.config, references=plugin.references, on_failure=on_failure)
    plugin.on_change = supervisor.notify
    supervisor.start()
    return supervisor


def stop_supervisor(supervisor: Optional["Supervisor"]) -> None:
    if supervisor is not None:
        supervisor.stop()
# ----------------------------------------------------------------------------------------


# ---- CLOUDWATCH LOGS -------------------------------------------------------------------
# [cloudwatch-log] enabled = true: each request's log line and the supervisor's actions also
# go to CloudWatch Logs, through one bounded queue and thread (efsplug/logsink.py), to
# the stream "<instance-id> - efsplug-agent.log". Read at start: a change needs a restart.
def start_cloudwatch(args: argparse.Namespace) -> Optional[LogSink]:
    config = load_config(args.config).config
    if not config.cloudwatch_log.enabled:
        return None
    return start_sink(config, log_name=AGENT_LOG, warn=say)


def stop_cloudwatch(sink: Optional[LogSink]) -> None:
    if sink is None:
        return
    report = sink.close(FLUSH_TIMEOUT)
    say(report.warning() or report.summary())
# ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    sink: Optional[LogSink] = None
    stopping = threading.Event()  # set by SIGTERM/SIGINT, or by the supervisor's death
    try:
        plugin = build_plugin(args)
        sink = start_cloudwatch(args)
        server = AgentServer(bind_socket(args.socket), plugin, RequestLog(sink=sink))
        supervisor = start_supervisor(args, plugin, sink, on_failure=stopping.set)
        mounts = MountService.start_at(Path(handoff.socket_path(os.environ)))  # mount.efs's work, done warm
    except (EfsplugError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        stop_cloudwatch(sink)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # SIGHUP (a closed terminal, a habit of `kill -HUP` to reload) must not stop the plugin
    # every container's volumes depend on. There is nothing to reload: efs-utils.conf is
    # read at every mount, and the rest takes a restart.
    signal.signal(signal.SIGHUP, lambda signum, frame: say(
        "SIGHUP ignored: efs-utils.conf is read at every mount; restart the service for the rest"))
    serving = threading.Thread(target=server.serve_forever, name="efsplug-agent-accept", daemon=True)
    serving.start()
    say(f"serving {args.socket} ({len(plugin.volumes)} volumes, state {args.state})")
    notify("READY=1")
    try:
        stopping.wait()
    finally:
        notify("STOPPING=1")
        server.shutdown()
        server.remove_socket()
        server.server_close()
        if not server.wait_idle(DRAIN_TIMEOUT):
            say("requests still running at shutdown; exiting anyway")
        if mounts is not None:
            mounts.stop()
        stop_supervisor(supervisor)
        stop_cloudwatch(sink)
    if supervisor is not None and supervisor.failed.is_set():
        say(f"the supervisor died ({type(supervisor.error).__name__}: {supervisor.error}); exiting 1 "
            "for the service to be restarted; mounts left in place")
        return 1
    say("stopped; mounts left in place")
    return 0
