#!/usr/bin/python3
"""PID 1 of the user-mode Linux guest: set the guest up, fail closed, then run the agent.

Runs inside the guest with the host's `/` as a read-only root (stdlib only, Python 3.9+).
The host passes `EFSBED_CONFIG=<json file>` on the kernel command line; see guest.py for
the layout this builds and why.

Fail closed: every step must succeed, and the network interface only comes up after the
firewall is in place, so a guest without its DNAT and drop rules never reaches anything.
On any failure the guest prints `efsbed-guest: FATAL ...` and powers off at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

PREFIX = "efsbed-guest:"
RB_POWER_OFF = 0x4321FEDC
GATEWAY = "10.0.2.2"  # the host, as slirp shows it
GUEST_ADDR = "10.0.2.15/24"
OVERLAY_ROOT = "/run/efsbed/ov"
# tmpfs where the read-only root must become writable and nothing from the host is needed.
TMPFS_DIRS = ("/tmp", "/mnt", "/srv", "/root", "/var/tmp", "/var/log")
# Overlays keep the host's files visible while letting the guest write.
OVERLAY_DIRS = ("/etc", "/usr/lib", "/usr/sbin", "/var")
MODULES = (
    "nfsv4", "ipv6", "ip_tables", "iptable_nat", "iptable_filter", "nf_nat", "xt_nat", "xt_tcpudp",
    "ipt_REJECT", "ip6_tables", "ip6table_filter",
)
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


def ipv4_rules(forwards: Sequence[Dict[str, object]]) -> str:
    """iptables-restore input: DNAT for the forwards, and drop all else that leaves eth0.

    This kernel has no nftables for ip/inet (CONFIG_NF_TABLES_IPV4 is off), so the rules
    go through iptables-legacy. filter OUTPUT runs after nat OUTPUT, so it sees the
    rewritten destination: only traffic to the host survives (DNS to slirp's 10.0.2.3
    included). REJECT rather than a bare DROP so a blocked connect fails at once instead
    of retrying its SYN until a timeout; the DROP behind it catches anything REJECT lets by.
    """
    dnat = "".join(
        f"-A OUTPUT -d {f['guest_ip']}/32 -p tcp -m tcp --dport {int(f['guest_port'])}"
        f" -j DNAT --to-destination {GATEWAY}:{int(f['host_port'])}\n"
        for f in forwards
    )
    return (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f":POSTROUTING ACCEPT [0:0]\n{dnat}COMMIT\n"
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f"-A OUTPUT -d {GATEWAY}/32 -o eth0 -j ACCEPT\n"
        "-A OUTPUT -o eth0 -p tcp -j REJECT --reject-with tcp-reset\n"
        "-A OUTPUT -o eth0 -j REJECT --reject-with icmp-port-unreachable\n-A OUTPUT -o eth0 -j DROP\n"
        "-A FORWARD -o eth0 -j DROP\nCOMMIT\n"
    )


# Nothing of IPv6 may leave eth0 either (slirp may offer it once the module is loaded).
IPV6_RULES = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
    "-A OUTPUT -o eth0 -j DROP\n-A FORWARD -o eth0 -j DROP\nCOMMIT\n"


def setup_filesystems(cfg: Dict[str, object]) -> None:
    release = os.uname().release
    mount("proc", "proc", "/proc")
    mount("sysfs", "sys", "/sys")
    mount("tmpfs", "tmpfs", "/run", "mode=755")
    # No /lib/modules on the host: load overlay by path, then give modprobe a module tree.
    sh("insmod", f"/usr/lib/uml/modules/{release}/kernel/fs/overlayfs/overlay.ko")
    for d in OVERLAY_DIRS:
        layer = os.path.join(OVERLAY_ROOT, d.strip("/").replace("/", "_"))
        os.makedirs(layer + "/upper")
        os.makedirs(layer + "/work")
        mount("overlay", "overlay", d, f"lowerdir={d},upperdir={layer}/upper,workdir={layer}/work")
    os.makedirs("/usr/lib/modules", exist_ok=True)
    os.symlink(f"/usr/lib/uml/modules/{release}", f"/usr/lib/modules/{release}")
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


def _restore(tool: str, rules: str, must_contain: Sequence[str]) -> None:
    res = subprocess.run([tool + "-restore"], input=rules.encode(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=BASE_ENV)
    if res.returncode != 0:
        raise RuntimeError(f"{tool}-restore -> rc {res.returncode}: {res.stdout.decode(errors='replace')}")
    saved = subprocess.run([tool + "-save"], stdout=subprocess.PIPE, env=BASE_ENV).stdout.decode()
    for line in must_contain:
        if line not in saved:
            raise RuntimeError(f"{tool}: rule {line!r} is not in place after restore")


def setup_network(cfg: Dict[str, object]) -> None:
    for module in MODULES:
        sh("modprobe", module)
    forwards = list(cfg.get("forwards", []))  # type: ignore[arg-type]
    expected = [
        "-A OUTPUT -o eth0 -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -o eth0 -j DROP",
        "-A FORWARD -o eth0 -j DROP",
    ] + [f"--to-destination {GATEWAY}:{int(f['host_port'])}" for f in forwards]
    _restore("iptables-legacy", ipv4_rules(forwards), expected)
    _restore("ip6tables-legacy", IPV6_RULES, ["-A OUTPUT -o eth0 -j DROP"])
    sh("sysctl", "-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=1")
    # Only now may the interface come up.
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "addr", "add", GUEST_ADDR, "dev", "eth0")
    sh("ip", "link", "set", "eth0", "up")
    sh("ip", "route", "add", "default", "via", GATEWAY)


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

    Everything above (filesystems, fail-closed firewall, network) is already in place and
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
    step = "reading the configuration"
    try:
        cfg_path = os.environ["EFSBED_CONFIG"]
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["config_path"] = cfg_path
        steps = (
            ("filesystems", setup_filesystems),
            ("network and firewall", setup_network),
            ("/etc", write_etc),
            ("sbin and shares", setup_sbin_and_shares),
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
