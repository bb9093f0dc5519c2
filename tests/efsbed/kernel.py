"""Which user-mode Linux kernel the bed boots, and everything that differs between them.

Two kernels, both with a real NFSv4.1 client (testbed.md):

* ``debian12``: Debian 12's ``user-mode-linux`` package (6.1), installed by setup-host.
  Its legacy ``eth0=vde,<dir>`` network transport gives the guest ``eth0``.
* ``uml7``: Debian unstable's ``user-mode-linux`` (7.x), unpacked beside its own libc into
  UML7_DIR by setup-host (never installed over the system). On CPUs with AMX Debian 12's
  kernel panics as soon as init runs (the host refuses its short XSAVE state); this one
  boots. 7.x dropped the legacy transport: the vector driver's vde transport gives ``vec0``.

``EFSBED_KERNEL=debian12|uml7`` forces a choice; otherwise the default is Debian 12's
kernel if a probe boot of it reaches init on this machine, else uml7. The probe's verdict
is cached per CPU and kernel binary, so only the first run on a machine pays for it.

Run as ``python -m efsbed.kernel`` to print the choice (setup-host does), or with
``--others`` to list the other kernels that boot here (scripts/test smoke-tests each).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

NAMES = ("debian12", "uml7")
ENV = "EFSBED_KERNEL"
UML7_DIR = Path(os.environ.get("EFSBED_UML7_DIR", "/var/cache/efsbed/uml7"))
CACHE = Path(os.environ.get("EFSBED_KERNEL_CACHE", "/var/cache/efsbed/kernel-probe.json"))
INIT = Path(__file__).resolve().with_name("guest_init.py")
PROBE_MARK = "efsbed-guest: probe ok"
PROBE_TIMEOUT = 60.0


class KernelError(RuntimeError):
    """No usable kernel: one line that says what was tried and why it failed."""


@dataclass(frozen=True)
class Kernel:
    name: str
    binary: Path
    modules: Path  # the module tree of this release (<...>/modules/<release>), on the host's /
    iface: str  # the guest's network interface
    transport: str  # the kernel argument that attaches iface to a vde switch; {switch} = its dir

    @property
    def release(self) -> str:
        return self.modules.name

    def net_arg(self, switch_dir: Path) -> str:
        return self.transport.format(switch=switch_dir)

    def describe(self) -> str:
        return f"{self.name} (Linux {self.release}, {self.binary})"


def _module_tree(base: Path) -> Path:
    """The single release directory under base (…/uml/modules/<release>)."""
    trees = sorted(p for p in base.glob("*") if (p / "modules.dep").is_file()) if base.is_dir() else []
    if len(trees) != 1:
        raise KernelError(f"expected one module tree with modules.dep under {base}, found {len(trees)}")
    return trees[0]


def debian12() -> Kernel:
    binary = Path("/usr/bin/linux.uml")
    if not binary.is_file():
        raise KernelError("debian12: /usr/bin/linux.uml is missing; run scripts/lib/setup-host")
    return Kernel("debian12", binary, _module_tree(Path("/usr/lib/uml/modules")), "eth0", "eth0=vde,{switch}")


def uml7() -> Kernel:
    binary = UML7_DIR / "linux.uml"
    if not binary.is_file():
        raise KernelError(f"uml7: {binary} is missing; run scripts/lib/setup-host")
    modules = _module_tree(UML7_DIR / "root/usr/lib/uml/modules")
    return Kernel("uml7", binary, modules, "vec0", "vec0:transport=vde,vnl=vde://{switch}")


FACTORIES = {"debian12": debian12, "uml7": uml7}


def by_name(name: str) -> Kernel:
    if name not in FACTORIES:
        raise KernelError(f"{ENV}={name!r} is not a kernel of the bed; use one of {', '.join(NAMES)}")
    return FACTORIES[name]()


@functools.lru_cache(maxsize=None)
def select() -> Kernel:
    """The kernel this run boots: forced by EFSBED_KERNEL, else the default for this machine."""
    forced = os.environ.get(ENV, "").strip()
    return by_name(forced) if forced else default()


def default() -> Kernel:
    """Debian 12's kernel where it boots, else the newer one; the reasons if neither does."""
    tried = []
    for name in NAMES:
        kernel, why_not = _bootable(name)
        if kernel is not None:
            return kernel
        tried.append(why_not)
    amx = " (this CPU has AMX)" if cpu_has_amx() else ""
    raise KernelError(f"no user-mode Linux kernel boots on this machine{amx}: " + "; ".join(tried))


def _bootable(name: str) -> Tuple[Optional[Kernel], str]:
    """(the kernel, "") if it is installed and its probe boot reaches init, else (None, why not)."""
    try:
        kernel = by_name(name)
    except KernelError as exc:
        return None, str(exc)
    failure = cached_probe(kernel)
    if failure is not None:
        return None, f"{kernel.name} (Linux {kernel.release}): {failure}"
    return kernel, ""


def cpu_has_amx() -> bool:
    return "amx_tile" in _cpu_flags().split()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _probe_key(kernel: Kernel) -> str:
    st = kernel.binary.stat()
    raw = f"{kernel.name}|{kernel.binary}|{st.st_size}|{st.st_mtime_ns}|{_cpu_flags()}"
    return hashlib.sha256(raw.encode()).hexdigest()


def cached_probe(kernel: Kernel) -> Optional[str]:
    """probe(kernel), remembered per CPU flags and kernel binary (a failed probe is retried)."""
    key = _probe_key(kernel)
    cache = _read_cache()
    if cache.get(kernel.name) == key:
        return None
    failure = probe(kernel)
    if failure is None:
        cache[kernel.name] = key
        _write_cache(cache)
    return failure


def _read_cache() -> Dict[str, str]:
    try:
        data = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _write_cache(cache: Dict[str, str]) -> None:
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(CACHE)
    except OSError:
        pass  # only a cache: the next run probes again


def probe(kernel: Kernel, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """Boot kernel with no network up to its init and power off; None if it got there, else why."""
    workdir = Path(tempfile.mkdtemp(prefix="efsbed-probe-", dir="/tmp"))
    argv = [str(kernel.binary), *base_args(kernel, mem_mb=256, uml_dir=workdir), "EFSBED_PROBE=1"]
    try:
        code, console = _run_group(argv, timeout, env=dict(os.environ, TMPDIR="/dev/shm"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if PROBE_MARK in console:
        return None
    return boot_failure(console, timed_out=code is None)


def base_args(kernel: Kernel, *, mem_mb: int, uml_dir: Path) -> Tuple[str, ...]:
    """The kernel arguments every boot of the bed uses (no network, no configuration)."""
    return (
        f"mem={mem_mb}M", "rootfstype=hostfs", "rootflags=/", "ro", f"init={INIT}",
        "con=null", "con0=null,fd:1", f"uml_dir={uml_dir}",
    )


def _run_group(argv: list, timeout: float, env: Dict[str, str]) -> Tuple[Optional[int], str]:
    """Run argv in its own process group; kill the whole group when done or on timeout."""
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        out, _ = popen.communicate(timeout=timeout)
        code: Optional[int] = popen.returncode
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        out, _ = popen.communicate()
        code = None
    finally:
        try:
            os.killpg(popen.pid, signal.SIGKILL)  # UML's helper processes share the group
        except ProcessLookupError:
            pass
    return code, out.decode(errors="replace")


def boot_failure(console: str, timed_out: bool = False) -> str:
    """The one console line that says why the kernel did not reach (or left) init."""
    for pattern in (r"[^\n]*ptrace set fp regs failed[^\n]*", r"Kernel panic[^\n]*", r"[^\n]*error while loading[^\n]*"):
        found = re.search(pattern, console)
        if found:
            return found.group(0).strip()
    if timed_out:
        return "init did not run within the time limit"
    last = [line for line in console.splitlines() if line.strip()][-1:] or ["no console output"]
    return f"the kernel stopped: {last[0].strip()[:200]}"


def summary() -> str:
    """What the bed boots and why, in one line (demo transcript, pytest header, setup)."""
    how = f"forced by {ENV}" if os.environ.get(ENV, "").strip() else "the default for this machine"
    return f"{select().describe()}, {how}"


def others() -> Tuple[str, ...]:
    """The kernels besides the selected one that boot here (scripts/test smoke-tests each)."""
    chosen = select().name
    found = []
    for name in NAMES:
        if name == chosen:
            continue
        kernel, why_not = _bootable(name)
        if kernel is not None:
            found.append(name)
        else:
            print(f"efsbed: not testing {name}: {why_not}", file=sys.stderr)
    return tuple(found)


def main(argv: list) -> int:
    """`python -m efsbed.kernel` says the choice; `--others` lists the other kernels that boot."""
    try:
        print(" ".join(others()) if argv[1:] == ["--others"] else f"efsbed: kernel {summary()}")
    except KernelError as exc:
        print(f"efsbed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
