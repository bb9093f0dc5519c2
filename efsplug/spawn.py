"""A child process (mount.nfs4) with its output captured, waited for a slice at a time.

What efsplug.nfs needs of subprocess.Popen, on os.posix_spawn. Importing subprocess
costs a mount.efs that a resident efsplug prepared about 6 ms (it brings signal, enum,
threading and selectors): more than all the rest of its own work. posix_spawn is also
safe from the agent's threads, where a fork that runs Python code is not.

A child inside a network namespace is spawned by a short-lived thread that entered the
namespace first: setns(CLONE_NEWNET) moves only the calling thread, and a child starts
in the namespaces of the thread that spawned it. The caller's own thread never moves.
"""

from __future__ import annotations

import _thread
import os
import select
import time

TYPE_CHECKING = False  # typing is not imported at run time: mount.efs pays for every import
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence, Tuple

SIGKILL = 9
MAX_OUTPUT = 64 * 1024  # per stream; mount.nfs4 says a few lines, and only its last one is shown
_READ = 65536


class Child:
    """argv[0] started with stdin on /dev/null and stdout and stderr piped back.

    wait() returns (status, stdout, stderr) once it exited, or None while it still runs;
    kill() stops and reaps it. Always end with one of them exiting or kill(): either one
    reaps the child and closes the pipes.
    """

    def __init__(self, argv: Sequence[str], *, netns_fd: Optional[int] = None) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        try:
            self.pid = _spawn(list(argv), actions, netns_fd)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        self.returncode: Optional[int] = None
        self._out, self._err = out_r, err_r
        self._chunks: Dict[int, List[bytes]] = {out_r: [], err_r: []}
        self._kept: Dict[int, int] = {out_r: 0, err_r: 0}
        self._poller = select.poll()
        for fd in (out_r, err_r):
            self._poller.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> Optional[Tuple[int, str, str]]:
        deadline = time.monotonic() + timeout
        while self._kept:  # EOF on both pipes: the child has closed them by exiting
            ready = self._poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not ready:
                return None
            for fd, _ in ready:
                self._read(fd)
        if self.returncode is None:  # it exited (see above): this wait returns at once
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode, self._text(self._out), self._text(self._err)

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, SIGKILL)
            except ProcessLookupError:
                pass
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        for fd in list(self._kept):
            self._close(fd)

    def _read(self, fd: int) -> None:
        chunk = os.read(fd, _READ)
        if not chunk:
            self._close(fd)
        elif self._kept[fd] < MAX_OUTPUT:  # past the bound it is read (the child never blocks) and dropped
            self._chunks[fd].append(chunk[:MAX_OUTPUT - self._kept[fd]])
            self._kept[fd] += len(self._chunks[fd][-1])

    def _close(self, fd: int) -> None:
        self._poller.unregister(fd)
        os.close(fd)
        del self._kept[fd]

    def _text(self, fd: int) -> str:
        return b"".join(self._chunks[fd]).decode("utf-8", "replace")


def _spawn(argv: List[str], actions: list, netns_fd: Optional[int]) -> int:
    if netns_fd is None:
        return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    from efsplug.netns import CLONE_NEWNET, setns_function

    setns = setns_function()
    outcome: list = []
    done = _thread.allocate_lock()
    done.acquire()

    def in_namespace() -> None:
        try:
            setns(netns_fd, CLONE_NEWNET)
            outcome.append(os.posix_spawn(argv[0], argv, os.environ, file_actions=actions))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        finally:
            done.release()

    _thread.start_new_thread(in_namespace, ())
    try:
        done.acquire()  # two system calls, neither of which blocks
    except BaseException:  # a signal (efsplug.interrupt): let the spawn end, and stop its child
        done.acquire()
        if outcome and not isinstance(outcome[0], BaseException):
            os.kill(outcome[0], SIGKILL)
            os.waitpid(outcome[0], 0)
        raise
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]
