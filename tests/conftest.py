"""Session-wide guard: nothing the bed started may outlive the test session."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from efsbed import kernel, procs

# Agents and supervisors the host tests start serve mount.efs (efsplug.handoff) at this
# path, never at the host's /run/efsplug/mount.sock, where another test's mount.efs (or
# the machine's own) would find them. The guest has its own environment and default.
os.environ.setdefault("EFSPLUG_MOUNT_SOCKET", os.path.join(tempfile.mkdtemp(prefix="efsplug-tests-"), "mount.sock"))


def pytest_report_header(config: pytest.Config) -> str:
    try:
        return f"efsbed kernel: {kernel.summary()}"
    except kernel.KernelError as exc:
        return f"efsbed kernel: none: {exc}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    socket_dir = os.path.dirname(os.environ["EFSPLUG_MOUNT_SOCKET"])
    if os.path.basename(socket_dir).startswith("efsplug-tests-"):
        shutil.rmtree(socket_dir, ignore_errors=True)
    leftovers = [p for tag in sorted(procs.STARTED_TAGS) for p in procs.tagged_processes(tag)]
    if not leftovers:
        return
    lines = []
    for p in leftovers:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:120]}")
            p.kill()
        except Exception:  # already gone between the scan and the kill
            continue
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes started by the test bed outlived the session (killed now):\n" + "\n".join(lines)
    if reporter:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def tag():
    """A process tag for one module's bed pieces; when the module ends nothing tagged may run.

    Module fixtures that start processes take `tag`, so they are torn down before this check.
    """
    tag = procs.new_tag()
    yield tag
    assert procs.tagged_processes(tag) == []


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory):
    """The whole local EFS with a booted kernel guest, shared by the session's guest tests.

    Tests must leave it as they found it: unmount what they mounted (the fixture checks),
    and restore anything they reconfigure.
    """
    from efsbed.bed import Bed

    the_bed = Bed(tmp_path_factory.mktemp("bed"))
    the_bed.start()
    try:
        yield the_bed
    finally:
        the_bed.stop()


@pytest.fixture
def clean_guest(bed):
    """A guest test's guard: no efs/nfs mount, tunnel or state record may outlive it."""
    yield bed
    mounts = bed.run(["sh", "-c", "grep -E ' nfs4? ' /proc/mounts | cut -d' ' -f2"]).stdout.split()
    for mountpoint in mounts:
        bed.run(["umount", "-l", mountpoint])
    # Anchored at the program name: unanchored, the pattern also matched this very `sh -c`,
    # which pkill then killed before it could remove the state.
    bed.run(["sh", "-c", "pkill -f '^[^ ]*stunnel[^ ]* [^ ]*/run/efs/' ; rm -rf /run/efs"])
    assert not mounts, f"test left NFS mounts behind: {mounts}"


@pytest.fixture(scope="module")
def docker(bed):
    """A real dockerd in the session's kernel guest, for one module (its containers, volumes
    and data root go with it)."""
    from efsbed.docker import GuestDocker

    with GuestDocker(bed.guest, bed.workdir) as engine:
        yield engine
