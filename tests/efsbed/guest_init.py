#!/usr/bin/python3
"""PID 1 of the user-mode Linux guest: set the guest up, fail closed, then run the agent.

Runs inside the guest with the host's `/` as a read-only root (stdlib only, Python 3.9+).
The host passes `EFSBED_CONFIG=<json file>` on the kernel command line; see guest.py for
the layout this builds and why.

Fail closed: every step must succeed, and the network interface only comes up after the
routes that reach the host alone are in place, so a half-set-up guest never reaches anything.
On any failure the guest prints `efsbed-guest: FATAL ...` and powers off at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import subprocess
import sys
import time
from typing import Dict, List

PREFIX = "efsbed-guest:"
RB_POWER_OFF = 0x4321FEDC
GATEWAY = "10.0.2.2"  # the host, as slirp shows it
GUEST_ADDR = "10.0.2.15"
FORWARDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest_forward.py")
FORWARD_READY_WAIT = 30.0
OVERLAY_ROOT = "/run/efsbed/ov"
# tmpfs where the read-only root must become writable and nothing from the host is needed.
TMPFS_DIRS = ("/tmp", "/mnt", "/srv", "/root", "/var/tmp", "/var/log")
# Overlays keep the host's files visible while letting the guest write.
OVERLAY_DIRS = ("/etc", "/usr/lib", "/usr/sbin", "/var")
# modprobe pulls in each one's dependencies (netfs, sunrpc, lockd, ...); veth for namespaces.
MODULES = ("nfsv4", "veth")
# Linux 6.19+ asks for directory delegations by default (GET_DIR_DELEGATION). Debian 12's
# NFS-Ganesha answers that with NFS4ERR_OP_ILLEGAL instead of NOTSUPP (nfs-ganesha issue
# 1385), which fails the whole compound and the client reports EREMOTEIO on the next
# directory read. The bed's server is at fault, not the product: where the kernel has the
# switch, the guest's client does not ask.
MODULE_OPTIONS = {"nfsv4": {"directory_delegations": "0"}}
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
}


def log(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def power_off() -> None:
    """Power off now; if even that fails, PID 1 exiting panics the kernel, which also ends UML."""
    try:
        os.sync()
    except OSError:
        pass
    try:
        ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)
    finally:
        os._exit(1)


def sh(*argv: str) -> None:
    """Run a setup command; any failure is fatal (raised, then caught by main)."""
    res = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=BASE_ENV)
    if res.returncode != 0:
        out = res.stdout.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv)} -> rc {res.returncode}: {out}")


def mount(fstype: str, source: str, target: str, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    argv = ["mount", "-t", fstype, source, target]
    if options:
        argv += ["-o", options]
    sh(*argv)


def setup_filesystems(cfg: Dict[str, object]) -> None:
    release = os.uname().release
    modules = str(cfg["modules"])  # this kernel's module tree on the host's root (kernel.py)
    if os.path.basename(modules) != release:
        raise RuntimeError(f"module tree {modules} is not for this kernel ({release})")
    mount("proc", "proc", "/proc")
    mount("sysfs", "sys", "/sys")
    mount("tmpfs", "tmpfs", "/run", "mode=755")
    # No /lib/modules on the host: load overlay by path, then give modprobe a module tree.
    sh("insmod", f"{modules}/kernel/fs/overlayfs/overlay.ko")
    for d in OVERLAY_DIRS:
        layer = os.path.join(OVERLAY_ROOT, d.strip("/").replace("/", "_"))
        os.makedirs(layer + "/upper")
        os.makedirs(layer + "/work")
        mount("overlay", "overlay", d, f"lowerdir={d},upperdir={layer}/upper,workdir={layer}/work")
    os.makedirs("/usr/lib/modules", exist_ok=True)
    os.symlink(modules, f"/usr/lib/modules/{release}")
    for d in TMPFS_DIRS:
        mode = "1777" if d.endswith("tmp") else "755"
        mount("tmpfs", "tmpfs", d, f"mode={mode}")
    # What a container engine needs (testbed.md: dockerd inside the guest).
    mount("tmpfs", "tmpfs", "/dev/shm", "mode=1777")
    mount("devpts", "devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666")
    mount("mqueue", "mqueue", "/dev/mqueue")
    mount("cgroup2", "cgroup2", "/sys/fs/cgroup", "nsdelegate")
    # The workdir stays visible at its own path (it may be under /tmp) and writable.
    workdir = str(cfg["workdir"])
    mount("hostfs", "none", workdir, workdir)


def module_options(module: str) -> List[str]:
    """MODULE_OPTIONS for module, keeping only the parameters this kernel's module has."""
    res = subprocess.run(["modinfo", "-F", "parm", module], stdout=subprocess.PIPE, env=BASE_ENV, check=True)
    known = {line.split(":", 1)[0] for line in res.stdout.decode().splitlines()}
    return [f"{k}={v}" for k, v in MODULE_OPTIONS.get(module, {}).items() if k in known]


def find_interface() -> str:
    """The guest's one network interface (eth0 or vec0, by kernel): the only one but lo at boot."""
    found = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    if len(found) != 1:
        raise RuntimeError(f"expected one network interface besides lo, found {found}")
    return found[0]


def start_forwarder(cfg: Dict[str, object]) -> None:
    """Start guest_forward.py (it outlives init's setup) and wait until every listener is bound.

    After the shares: the checkout holding it may sit under /tmp, a tmpfs here until then.
    """
    forwards = list(cfg.get("forwards", []))  # type: ignore[arg-type]
    log = open("/var/log/efsbed-forward.log", "ab")
    proc = subprocess.Popen([sys.executable, FORWARDER, json.dumps(forwards)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=log, env=BASE_ENV)
    log.close()
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], FORWARD_READY_WAIT)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"the forwarder did not get ready (said {line!r}); see /var/log/efsbed-forward.log")
    proc.stdout.close()


def setup_network(cfg: Dict[str, object]) -> None:
    """Forwards' addresses on lo (start_forwarder relays them later); the link reaches the host
    (10.0.2.2) and nothing else.

    Fail closed by routing, which every kernel has (the 7.x one has no IPv4 packet filter):
    the guest owns 10.0.2.15/32, so not even slirp's DNS at 10.0.2.3 is on-link; one host
    route leads to 10.0.2.2; the default route is `unreachable`, so any other address fails
    at once. IPv6 is off on the link. The link comes up only after all of that.
    """
    for module in MODULES:
        sh("modprobe", module, *module_options(module))
    if not os.path.isdir("/proc/sys/net/ipv6"):
        sh("modprobe", "ipv6")  # a module in 6.1, built in (and not listed as such) in 7.x
    iface = find_interface()
    forwards = list(cfg.get("forwards", []))  # type: ignore[arg-type]
    sh("ip", "link", "set", "lo", "up")
    for ip in sorted({str(f["guest_ip"]) for f in forwards}):
        sh("ip", "addr", "add", f"{ip}/128" if ":" in ip else f"{ip}/32", "dev", "lo")
    sh("sysctl", "-q", "-w", f"net.ipv6.conf.{iface}.disable_ipv6=1")
    sh("ip", "route", "add", "unreachable", "default")
    sh("ip", "addr", "add", f"{GUEST_ADDR}/32", "dev", iface)
    sh("ip", "link", "set", iface, "up")
    sh("ip", "route", "add", f"{GATEWAY}/32", "dev", iface, "src", GUEST_ADDR)
    routes = subprocess.run(["ip", "-4", "route", "show"], stdout=subprocess.PIPE, env=BASE_ENV).stdout.decode()
    lines = [line.split() for line in routes.splitlines()]
    if [w[:2] for w in lines if "default" in w] != [["unreachable", "default"]] or any("via" in w for w in lines):
        raise RuntimeError(f"routes are not fail-closed after setup: {routes!r}")
    log(f"network: {iface} {GUEST_ADDR}/32, route to {GATEWAY} only, {len(forwards)} forwards")


def write_etc(cfg: Dict[str, object]) -> None:
    hosts: Dict[str, str] = dict(cfg.get("hosts", {}))  # type: ignore[arg-type]
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{name}" for name, ip in sorted(hosts.items())]
    for path, text in (
        ("/etc/hosts", "\n".join(lines) + "\n"),
        # Nothing listens on the guest's 127.0.0.1:53, so unknown names fail fast.
        ("/etc/resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"),
        ("/etc/hostname", "efsbed-guest\n"),
    ):
        if os.path.islink(path):
            os.unlink(path)
        with open(path, "w") as f:
            f.write(text)
    sh("hostname", "efsbed-guest")


def setup_sbin_and_shares(cfg: Dict[str, object]) -> None:
    # Shares first: an sbin target may live in one (a checkout under /tmp, which is tmpfs here).
    shares: Dict[str, str] = dict(cfg.get("shares", {}))  # type: ignore[arg-type]
    for guest_dir, host_dir in shares.items():
        mount("hostfs", "none", guest_dir, host_dir)
    sbin: Dict[str, str] = dict(cfg.get("sbin", {}))  # type: ignore[arg-type]
    for name, target in sbin.items():
        link = os.path.join("/usr/sbin", name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
        if not os.access(link, os.X_OK):
            raise RuntimeError(f"sbin {name} -> {target} is not executable in the guest")


def run_agent(cfg: Dict[str, object]) -> None:
    """Start the agent, then reap every orphan (daemons) as PID 1 must; power off when it ends."""
    agent = str(cfg["agent"])
    argv: List[str] = [sys.executable, agent, str(cfg["config_path"])]
    pid = os.fork()
    if pid == 0:
        try:
            os.execve(argv[0], argv, BASE_ENV)
        finally:
            os._exit(127)
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if done == pid:
            log(f"agent exited (status {status}); powering off")
            break
    power_off()


def exec_systemd(cfg: Dict[str, object]) -> None:
    """Hand PID 1 to the host's systemd, with the control agent as a service.

    Everything above (filesystems, fail-closed routes, the relay) is already in place and
    systemd does not touch it; the target pulls in only basic.target and the agent, so a
    test can install and start real units and see them behave as on an ECS host.
    """
    units = "/etc/systemd/system"
    os.makedirs(units, exist_ok=True)
    env = " ".join(f"{k}={v}" for k, v in BASE_ENV.items())
    with open(f"{units}/efsbed-agent.service", "w") as f:
        f.write(
            "[Unit]\nDescription=efsbed guest control agent\nDefaultDependencies=no\n"
            f"[Service]\nEnvironment={env}\n"
            f"ExecStart={sys.executable} {cfg['agent']} {cfg['config_path']}\n"
            # Commands the tests run (daemons included) stay in this cgroup; none may be killed
            # behind the test's back, and the host powers the guest off, not systemd.
            "KillMode=none\n"
        )
    with open(f"{units}/efsbed.target", "w") as f:
        f.write("[Unit]\nDescription=efsbed guest\nRequires=basic.target efsbed-agent.service\nAfter=basic.target\n")
    os.execv("/lib/systemd/systemd", ["/lib/systemd/systemd", "--system", "--unit=efsbed.target"])


def main() -> None:
    if os.environ.get("EFSBED_PROBE"):
        # kernel.py's probe boot: reaching init at all is the answer (AMX CPUs panic before).
        log("probe ok")
        power_off()
    step = "reading the configuration"
    try:
        cfg_path = os.environ["EFSBED_CONFIG"]
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["config_path"] = cfg_path
        steps = (
            ("filesystems", setup_filesystems),
            ("network", setup_network),
            ("/etc", write_etc),
            ("sbin and shares", setup_sbin_and_shares),
            ("forwards", start_forwarder),
        )
        started = time.monotonic()
        for step, fn in steps:
            fn(cfg)
        log(f"ready in {time.monotonic() - started:.2f}s; starting the agent")
    except BaseException as exc:  # noqa: BLE001 - anything at all must power off
        log(f"FATAL during {step}: {exc!r}; powering off")
        power_off()
    if cfg.get("systemd"):
        try:
            exec_systemd(cfg)
        except BaseException as exc:  # noqa: BLE001 - exec failed: nothing else may run
            log(f"FATAL starting systemd: {exc!r}; powering off")
            power_off()
    run_agent(cfg)


if __name__ == "__main__":
    main()
