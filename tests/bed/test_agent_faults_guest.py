"""Fault injection in the kernel guest: `efsplug agent` SIGKILLed inside Create, Mount,
Unmount and Remove, restarted, and the interrupted request retried as dockerd would.

Each case drives one volume (tls,iam,accesspoint) through Create -> Mount(A) -> Mount(B)
-> Unmount(A) -> Unmount(B) -> Remove and kills the agent once, inside one of those
requests. The kill points are of two kinds:

* freeze points: the guest-side driver (efsbed/agent_faults.py) polls for a step of the
  request to become visible -- the mount directory, its certificate, the stunnel, the
  mount record, the kernel mount; on the way down the kernel mount, the tunnel, the
  record gone; the agent's state file rewritten -- then SIGSTOPs the agent right there,
  notes what exists, and SIGKILLs it. Where the next step follows within microseconds
  (the answer after the state file's rename, stunnel.conf after the certificate), strace
  holds the agent at each rename or unlink for half a second, so the window is hit every
  time: tunnel started but no record, mounted but not recorded, state written but not
  answered, tunnel stopped but record kept;
* delays drawn from a seeded RNG in [0, the request's measured duration], for the two
  requests that take time (the first Mount, the last Unmount).

The requests are sent from inside the guest by that driver, as dockerd sends them; after
a kill the agent is started again and the interrupted request sent again if its answer
never came (as dockerd retries a failed container start), then the rest of the sequence.

Only the agent's pid is killed, as the OOM killer or a crash would under the unit's
KillMode=process; a mount.nfs4 or umount it was running finishes on its own before the
agent is started again (systemd waits RestartSec=2s; they take well under that here).

The agent runs with --no-supervisor: the in-process supervisor's orphan sweep (10 s) and
reaper (grace period) would clean some leftovers some seconds later, so whether a leak
showed would depend on timing. Without it the test proves what must hold on its own:
the plugin's requests and its start-up reconciliation leave nothing behind, which is also
all there is on a host with [mount-watchdog] enabled = false.

After every restart and every request, the agent's state for the volume must agree with
the kernel's mount table, and while the volume is not mounted nothing of its mount may
exist (tunnel, record, mount directory, certificate); after Remove nothing at all: no NFS
mount, no stunnel, no record, mount directory or certificate in /run/efs, no held port
lock, no volume in the agent's state, no mountpoint directory, no temp file.

A Mount whose state was written but whose answer was lost counts twice when retried with
the same ID (the agent cannot tell a retry from docker mounting the same ID again), so
that volume stays mounted after the last Unmount until Remove, which unmounts it; the
summary line says so where it happens.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import pytest

from efsbed.bed import REPO, Bed
from efsbed.guestmount import NOTHING_LEFT, kernel_mounts, leftovers
from efsplug.state import escape_path

pytestmark = pytest.mark.guest

ROOT = "/run/efsbed-faults"
SOCKET = f"{ROOT}/plugin.sock"
STATE_DIR = f"{ROOT}/state"
STATE = f"{STATE_DIR}/volumes.json"
VOLUMES = f"{ROOT}/volumes"
LOGS = f"{ROOT}/logs"
EFS_STATE = "/var/run/efs"  # the default state_dir; /run/efs in the guest
EFSPLUG = str(REPO / ".venv" / "bin" / "efsplug")
PYTHON = str(REPO / ".venv" / "bin" / "python")
DRIVER = str(REPO / "tests" / "efsbed" / "agent_faults.py")
ID_A, ID_B = "a" * 64, "b" * 64
OPS = ("create", "mount-A", "mount-B", "unmount-A", "unmount-B", "remove")
START_TIMEOUT = 60.0
GONE_TIMEOUT = 60.0


class Agent:
    """`efsplug agent` in the guest, on its own socket, state and volumes root; one log per start."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.pid: Optional[int] = None
        self.starts = 0

    @property
    def log_path(self) -> str:
        return f"{LOGS}/agent.{self.starts}.log"

    def start(self) -> None:
        assert self.pid is None
        self.starts += 1
        argv = [EFSPLUG, "agent", "--socket", SOCKET, "--state", STATE, "--volumes-root", VOLUMES, "--no-supervisor"]
        self.pid = self.bed.guest.spawn(argv, log=self.log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while "serving" not in self.log():
            assert self.bed.guest.kill(self.pid, 0), f"the agent exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"the agent did not serve within {START_TIMEOUT:g}s:\n{self.log()}"
            time.sleep(0.05)  # polling the guest for the agent's first line, bounded

    def log(self) -> str:
        return self.bed.run(["cat", self.log_path]).stdout

    def killed(self) -> None:
        """The driver SIGKILLed the agent: wait until it, and any child it left running, is gone."""
        assert self.pid is not None
        self._wait_gone(self.pid)
        self.pid = None

    def stop(self) -> None:
        if self.pid is not None:
            self.bed.guest.kill(self.pid, 9)  # the agent's process group: nothing of it may stay
            self._wait_gone(self.pid)
            self.pid = None

    def _wait_gone(self, pid: int) -> None:
        # guest.kill signals the process group: 0 reaches it while any member (the agent, a
        # mount.nfs4 or umount it started) lives. Tunnels run in their own sessions.
        deadline = time.monotonic() + GONE_TIMEOUT
        while self.bed.guest.kill(pid, 0):
            assert time.monotonic() < deadline, f"agent pid {pid} or a child of it did not exit"
            time.sleep(0.05)  # waiting for the exit, bounded


@dataclass(frozen=True)
class Case:
    id: str
    op: int  # index into OPS
    trigger: Dict[str, Any]
    freeze: bool = True  # a freeze point must be reached; a delay may fall after the answer
    seed: Optional[int] = None


@dataclass(frozen=True)
class Volume:
    name: str
    mountpoint: str
    prefix: str  # <fs id>.<escaped mountpoint>. : its mount directories and records start so

    def steps(self, bed: Bed) -> List[Dict[str, Any]]:
        opts = {"type": "efs", "device": bed.fs_id, "o": f"tls,iam,accesspoint={bed.access_points[0].id}"}
        calls = [
            ("VolumeDriver.Create", {"Name": self.name, "Opts": opts}),
            ("VolumeDriver.Mount", {"Name": self.name, "ID": ID_A}),
            ("VolumeDriver.Mount", {"Name": self.name, "ID": ID_B}),
            ("VolumeDriver.Unmount", {"Name": self.name, "ID": ID_A}),
            ("VolumeDriver.Unmount", {"Name": self.name, "ID": ID_B}),
            ("VolumeDriver.Remove", {"Name": self.name}),
        ]
        return [{"endpoint": endpoint, "payload": payload} for endpoint, payload in calls]


def volume_for(bed: Bed, name: str) -> Volume:
    mountpoint = f"{VOLUMES}/{name}"
    return Volume(name, mountpoint, f"{bed.fs_id}.{escape_path(mountpoint)}.")


def drive(bed: Bed, agent: Agent, volume: Volume, steps: List[Dict[str, Any]], kill_step: Optional[int] = None,
          trigger: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The steps sent in the guest, one after the other, the agent killed in kill_step."""
    spec = {"socket": SOCKET, "pid": agent.pid, "steps": steps, "kill_step": kill_step,
            "trigger": trigger or {"kind": "none"}, "state_dir": EFS_STATE, "prefix": volume.prefix,
            "mountpoint": volume.mountpoint, "state_file": STATE, "volume": volume.name}
    res = bed.run([PYTHON, "-I", "-S", DRIVER, json.dumps(spec)], timeout=300)
    assert res.rc == 0 and res.stdout.strip(), f"the guest driver failed: {res}"
    return json.loads(res.stdout)


def answered_ok(result: Dict[str, Any], what: str, agent: Agent) -> None:
    answer = result["answer"]
    assert answer is not None, f"{what}: no answer ({result['error']})\n{agent.log()}"
    assert answer["status"] == 200 and answer["body"].get("Err") == "", f"{what}: {answer}\n{agent.log()}"


def agrees(snap: Dict[str, Any], when: str) -> None:
    """The agent's state for the volume agrees with the kernel, and an unmounted volume has
    nothing left of its mount (directory, certificate, record, tunnel), nor the state a temp file."""
    state = snap["state"]
    assert state != "unreadable", f"{when}: the agent's state file cannot be read"
    assert snap["state_temps"] == [], f"{when}: temp files of the state file remain: {snap['state_temps']}"
    if state is None:
        assert not snap["mounted"], f"{when}: not in the agent's state, but mounted"
    else:
        assert state["mounted"] == snap["mounted"], \
            f"{when}: the agent's state says mounted={state['mounted']}, the kernel {snap['mounted']}"
        if sum(state["refs"].values()) > 0:
            assert snap["mounted"], f"{when}: referenced ({state['refs']}) but not mounted"
    if not snap["mounted"]:
        left = {k: snap[k] for k in ("dirs", "records", "tunnels") if snap[k]}
        assert left == {}, f"{when}: not mounted, but parts of its mount remain: {left}"


def found_at_kill(snap: Dict[str, Any]) -> str:
    state = snap["state"]
    if isinstance(state, dict):
        shown = f"state mounted={state['mounted']} refs={sum(state['refs'].values())}"
    else:
        shown = "no volume in the state" if state is None else f"state {state}"
    parts = [f"dir={len(snap['dirs'])}", f"cert={len(snap['certificates'])}", f"tunnel={len(snap['tunnels'])}",
             f"record={len(snap['records'])}", f"kernel={'mounted' if snap['mounted'] else 'no'}", shown]
    if snap["state_temps"]:
        parts.append("+state temp file")
    return " ".join(parts)


def run_sequence(bed: Bed, agent: Agent, volume: Volume, case: Optional[Case]) -> Dict[str, Any]:
    """The whole sequence with the case's kill, checked after every step; what happened, for the summary."""
    steps = volume.steps(bed)
    report: Dict[str, Any] = {"took": {}, "kill": None, "retried": False, "notes": [], "refs_left": 0}
    first = drive(bed, agent, volume, steps, case.op if case else None, case.trigger if case else None)
    agrees(first["before"], "before Create")
    for index, result in enumerate(first["steps"]):
        op = OPS[index]
        if result["fired"]:
            report["kill"] = result
            break
        answered_ok(result, op, agent)
        assert case is None or index != case.op or not case.freeze, \
            f"{case.id}: the kill point was never reached\n{agent.log()}"
        report["took"][op] = result["took"]
        agrees(result["snapshot"], f"after {op}")
        if op == "unmount-B":
            report["refs_left"] = sum((result["snapshot"]["state"] or {}).get("refs", {}).values())
    kill = report["kill"]
    if kill is None:
        assert len(first["steps"]) == len(steps)
        return report
    assert case is not None
    agent.killed()
    agent.start()
    report["notes"] = [line.split(": ", 2)[-1].replace(volume.prefix, "...")
                       for line in agent.log().splitlines()
                       if line.startswith(f"efsplug agent: volume {volume.name}: ")]
    if kill["answer"] is not None:
        answered_ok(kill, OPS[case.op], agent)  # the answer got out just before the kill
        resume = case.op + 1
    else:
        report["retried"] = True  # as dockerd would: the request failed, it is sent again
        resume = case.op
    second = drive(bed, agent, volume, steps[resume:])
    agrees(second["before"], f"{case.id}: right after the restart")
    for offset, result in enumerate(second["steps"]):
        op = OPS[resume + offset] + (" (retried)" if offset == 0 and report["retried"] else "")
        answered_ok(result, op, agent)
        agrees(result["snapshot"], f"{case.id}: after {op}")
        if op.startswith("unmount-B"):
            report["refs_left"] = sum((result["snapshot"]["state"] or {}).get("refs", {}).values())
    assert len(second["steps"]) == len(steps) - resume
    return report


def nothing_left(bed: Bed) -> Dict[str, Any]:
    """Everything the sequence could have left in the guest, beyond leftovers(bed)."""
    text = bed.run(["cat", STATE]).stdout
    return {
        **leftovers(bed),
        "agent_volumes": json.loads(text)["volumes"] if text else {},
        "mountpoint_dirs": bed.run(["ls", "-A", VOLUMES]).stdout.split(),
        "state_dir": sorted(bed.run(["ls", "-A", STATE_DIR]).stdout.split()),
    }


CLEAN = {**NOTHING_LEFT, "agent_volumes": {}, "mountpoint_dirs": [], "state_dir": ["volumes.json", "volumes.json.lock"]}


# --- fixtures ---------------------------------------------------------------------------

def _wipe(bed: Bed) -> None:
    """Whatever a failed case left: its NFS mounts, its tunnels (by pid), its files."""
    for mountpoint in kernel_mounts(bed):
        if mountpoint.startswith(VOLUMES + "/"):
            bed.run(["umount", "-l", mountpoint])
    for pid in bed.run(["pgrep", "-f", "^[^ ]*stunnel[^ ]* (/var)?/run/efs/"]).stdout.split():
        bed.run(["kill", "-9", pid])
    bed.run(["rm", "-rf", ROOT, "/run/efs"])


@pytest.fixture(scope="module")
def module_agent(bed: Bed) -> Iterator[Agent]:
    """One agent for the module: each case's restart is the next case's agent."""
    _wipe(bed)
    a = Agent(bed)
    try:
        yield a
    finally:
        a.stop()
        _wipe(bed)


@pytest.fixture
def agent(clean_guest: Bed, module_agent: Agent) -> Iterator[Agent]:
    """The running agent; after a case that left anything, a fresh one on a wiped guest."""
    if module_agent.pid is None:
        module_agent.start()
    yield module_agent
    if nothing_left(clean_guest) != CLEAN:
        module_agent.stop()
        _wipe(clean_guest)


@pytest.fixture(scope="module")
def durations(module_agent: Agent) -> Dict[str, float]:
    """How long each request takes here, from one undisturbed run (which must itself leave nothing)."""
    bed = module_agent.bed
    if module_agent.pid is None:
        module_agent.start()
    report = run_sequence(bed, module_agent, volume_for(bed, "undisturbed"), None)
    assert nothing_left(bed) == CLEAN
    print("undisturbed: " + " ".join(f"{op}={report['took'][op]:.3f}s" for op in OPS))
    return report["took"]


# --- the cases --------------------------------------------------------------------------

def _present(kind: str, **kw: Any) -> Dict[str, Any]:
    return {"kind": kind, "want": "present", **kw}


def _absent(kind: str, **kw: Any) -> Dict[str, Any]:
    return {"kind": kind, "want": "absent", **kw}


# Just after the agent's state file was put in place, before the answer (strace holds the
# rename's return); just before it would be (held at the rename, its temp file written).
STATE_WRITTEN = {"kind": "changed", "path": STATE, "stall": "exit"}
STATE_WRITE_CUT = _present("entry", **{"in": STATE_DIR}, prefix=".volumes.json.", suffix=".tmp", stall="enter")
FREEZE_CASES = [
    Case("create/state-written", 0, STATE_WRITTEN),
    Case("mount-A/dir-made", 1, _present("entry", isdir=True)),
    # Held at each rename: the certificate is in place, stunnel.conf not yet.
    Case("mount-A/certificate-written", 1, _present("entry", isdir=True, child="certificate.pem", stall="enter")),
    Case("mount-A/tunnel-started", 1, _present("stunnel")),
    Case("mount-A/record-written", 1, _present("entry", suffix=".json", isdir=False)),
    Case("mount-A/state-write-cut", 1, STATE_WRITE_CUT),
    Case("mount-A/state-written", 1, STATE_WRITTEN),
    Case("mount-B/state-written", 2, STATE_WRITTEN),
    Case("unmount-A/state-written", 3, STATE_WRITTEN),
    Case("unmount-B/kernel-unmounted", 4, _absent("mount")),
    # Held at each unlink: the tunnel is gone, its files and record not yet.
    Case("unmount-B/tunnel-stopped", 4, _absent("stunnel", stall="enter", calls="unlink,unlinkat,rmdir")),
    Case("unmount-B/record-removed", 4, _absent("entry", suffix=".json", isdir=False, stall="enter")),
    Case("unmount-B/state-written", 4, STATE_WRITTEN),
    Case("remove/state-written", 5, STATE_WRITTEN),
]
# Seeded delays into the two requests that take time: (op, seed).
DELAY_CASES = [Case(f"{OPS[op]}/delay-seed{seed}", op, {"kind": "delay"}, freeze=False, seed=seed)
               for op, seed in ((1, 1), (1, 2), (1, 3), (4, 1), (4, 2))]


@pytest.mark.parametrize("case", FREEZE_CASES + DELAY_CASES, ids=lambda c: c.id)
def test_agent_killed_inside_a_request_restarts_and_leaves_nothing(
        agent: Agent, durations: Dict[str, float], case: Case) -> None:
    bed = agent.bed
    started = time.monotonic()
    if case.seed is not None:
        seconds = random.Random(case.seed).uniform(0.0, durations[OPS[case.op]])
        case = Case(case.id, case.op, {"kind": "delay", "seconds": seconds}, freeze=False, seed=case.seed)
    volume = volume_for(bed, "vol-" + case.id.replace("/", "-"))
    report = run_sequence(bed, agent, volume, case)
    assert nothing_left(bed) == CLEAN, agent.log()
    kill = report["kill"]
    point = f"killed at {kill['after']:.3f}s: {found_at_kill(kill['snapshot'])}" if kill else "never killed"
    answer = "no answer: retried" if report["retried"] else "answered before the kill"
    notes = "; ".join(report["notes"]) or "nothing to reconcile"
    stale = (f"; {report['refs_left']} stale reference(s) kept it mounted until Remove"
             if report["refs_left"] else "")
    print(f"{case.id}: {point}; {answer}; restart: {notes}{stale}; end: nothing left "
          f"({time.monotonic() - started:.1f}s)")
