"""The RPM and the systemd units, checked with the real tools (rpmbuild, rpmlint, rpm,
systemd-analyze, systemd-tmpfiles, /bin/sh); the scriptlet test with a live mount runs
in the kernel guest.

The package is built once per module by scripts/build-rpm and installed with
`rpm -i --nodeps --noscripts` into a scratch root (its rpm database inside that root).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from efsbed import rpmform
from efsplug import __version__
from efsplug.config import Config, parse_config

REPO = Path(__file__).resolve().parents[2]
UNITS = ("amazon-ecs-volume-plugin.service", "efsplug-supervisor.service")
# build-rpm targets this host's /usr/bin/python3 by default, whatever venv runs the tests.
PY = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                    capture_output=True, text=True, check=True).stdout.strip()
SITELIB = f"/usr/lib/python{PY}/site-packages"


def _run(argv: List[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


@dataclass(frozen=True)
class Built:
    rpm: Path
    root: Path  # scratch root the package is installed into


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("rpm")
    result = _run([str(REPO / "scripts/build-rpm"), "--outdir", str(out)], timeout=300)
    assert result.returncode == 0, f"build-rpm failed:\n{result.stdout}\n{result.stderr}"
    rpm = Path(result.stdout.strip().splitlines()[-1])
    assert rpm.parent == out and rpm.name == f"efsplug-{__version__}-1.noarch.rpm", result.stdout
    root = tmp_path_factory.mktemp("scratch-root")
    installed = _run(["rpm", "-i", "--nodeps", "--noscripts", "--root", str(root), "--dbpath", "/rpmdb", str(rpm)])
    assert installed.returncode == 0, installed.stderr
    return Built(rpm, root)


# --- the package ------------------------------------------------------------------------

def test_rpmlint_reports_no_errors(built: Built) -> None:
    result = _run(["rpmlint", "-r", str(REPO / "rpm/efsplug.rpmlintrc"), str(built.rpm)])
    print(result.stdout)  # warnings are allowed; shown with -s
    summary = [line for line in result.stdout.splitlines() if "packages and" in line]
    assert summary and " 0 errors" in summary[-1], result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr


# path -> (kind, mode, owner, group); kind: f file, d directory
EXPECTED: Dict[str, Tuple[str, int, str, str]] = {
    "/sbin/mount.efs": ("f", 0o755, "root", "root"),
    "/usr/bin/efsplug": ("f", 0o755, "root", "root"),
    "/etc/amazon/efs": ("d", 0o755, "root", "root"),
    "/etc/amazon/efs/efs-utils.conf": ("f", 0o644, "root", "root"),
    "/etc/systemd/system/amazon-ecs-volume-plugin.service": ("f", 0o644, "root", "root"),
    "/usr/lib/systemd/system/efsplug-supervisor.service": ("f", 0o644, "root", "root"),
    "/usr/lib/tmpfiles.d/efsplug.conf": ("f", 0o644, "root", "root"),
    "/var/lib/ecs": ("d", 0o755, "root", "root"),
    "/var/lib/ecs/data": ("d", 0o755, "root", "root"),
    "/var/lib/ecs/volumes": ("d", 0o700, "root", "root"),
    "/var/log/amazon/efs": ("d", 0o750, "root", "root"),
    "/usr/share/doc/efsplug/install.md": ("f", 0o644, "root", "root"),
    f"{SITELIB}/efsplug/__init__.py": ("f", 0o644, "root", "root"),
    f"{SITELIB}/efsplug-{__version__}.dist-info/METADATA": ("f", 0o644, "root", "root"),
    f"{SITELIB}/efsplug-{__version__}.dist-info/INSTALLER": ("f", 0o644, "root", "root"),
}


def _describe(path: Path) -> Tuple[str, int, str, str]:
    import grp
    import pwd

    st = path.lstat()
    kind = "d" if stat.S_ISDIR(st.st_mode) else "f" if stat.S_ISREG(st.st_mode) else "other"
    return kind, stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


def test_installed_files_have_their_modes_and_owners(built: Built) -> None:
    actual = {path: _describe(built.root / path.lstrip("/")) for path in EXPECTED
              if (built.root / path.lstrip("/")).exists()}
    assert actual == EXPECTED
    # Every module of the product is installed, readable by all, and nothing else is.
    tracked = _run(["git", "ls-files", "efsplug"], cwd=REPO).stdout.split()
    site = built.root / SITELIB.lstrip("/")
    for module in (m for m in tracked if m.endswith(".py") and (REPO / m).exists()):
        assert _describe(site / module) == ("f", 0o644, "root", "root"), module
    assert sorted(p.name for p in site.iterdir()) == ["efsplug", f"efsplug-{__version__}.dist-info"]
    # pip's RECORD would list files rpm owns; it is dropped.
    assert not (site / f"efsplug-{__version__}.dist-info/RECORD").exists()


def _file_table(rpm: Path) -> Dict[str, Tuple[str, str, str, str]]:
    out = _run(["rpm", "-qp", "--qf", "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t%{FILEFLAGS:fflags}\n]", str(rpm)])
    assert out.returncode == 0, out.stderr
    rows = (line.split("\t") for line in out.stdout.splitlines())
    return {name: (perms, user, flags, "") for name, perms, user, flags in rows}


def test_state_dir_is_a_ghost_created_by_tmpfiles_at_boot(built: Built) -> None:
    table = _file_table(built.rpm)
    assert table["/run/efs"][:3] == ("drwxr-x---", "root", "g")  # %ghost: rpm owns it, boot makes it
    assert not (built.root / "run/efs").exists()
    assert (built.root / "usr/lib/tmpfiles.d/efsplug.conf").read_text() == "d /run/efs 0750 root root -\n"
    result = _run(["systemd-tmpfiles", "--create", f"--root={built.root}"])
    assert result.returncode == 0, result.stderr
    assert _describe(built.root / "run/efs") == ("d", 0o750, "root", "root")


def test_config_is_noreplace_and_is_efs_utils_defaults_with_the_system_ca_bundle(built: Built) -> None:
    assert _file_table(built.rpm)["/etc/amazon/efs/efs-utils.conf"][2] == "cn"  # %config(noreplace)
    loaded = parse_config((built.root / "etc/amazon/efs/efs-utils.conf").read_text(), source="shipped")
    assert loaded.warnings == []
    defaults = Config(source="shipped")
    assert loaded.config == replace(defaults, mount=replace(defaults.mount, stunnel_cafile="/etc/pki/tls/certs/ca-bundle.crt"))


def test_dependencies_and_replacements(built: Built) -> None:
    def query(what: str) -> List[str]:
        return _run(["rpm", "-qp", f"--{what}", str(built.rpm)]).stdout.splitlines()

    requires = query("requires")
    for needed in ("nfs-utils", "(stunnel5 or stunnel)", "python3 >= 3.9", "python3-botocore",
                   "python3-cryptography", "python3-psutil", f"python(abi) = {PY}"):
        assert needed in requires, requires
    # efs-utils below 3 replaced, 3.x (S3 Files) refused: test_packaging_al2023.py installs them.
    assert query("obsoletes") == ["amazon-efs-utils < 3"] and query("conflicts") == ["amazon-efs-utils >= 3"]
    assert {"amazon-efs-utils = 3~efsplug", f"amazon-ecs-volume-plugin = {__version__}"} <= set(query("provides"))
    assert _run(["rpm", "-qp", "--qf", "%{ARCH}", str(built.rpm)]).stdout == "noarch"


def _layout_env(built: Built) -> Dict[str, str]:
    # The scratch root's package first, then the venv's dependencies (botocore, ...);
    # PYTHONPATH entries run no .pth files, so the venv's editable efsplug stays out.
    deps = sysconfig.get_path("purelib")
    return {**os.environ, "PYTHONPATH": f"{built.root}{SITELIB}:{deps}"}


@pytest.mark.parametrize("script, flags, expected", [
    ("sbin/mount.efs", "-sS", f"mount.efs (efsplug) {__version__}"),  # -S: efsplug.helper adds site when it needs it
    ("usr/bin/efsplug", "-s", f"efsplug {__version__}"),
])
def test_installed_commands_run_from_the_scratch_layout(built: Built, script: str, flags: str, expected: str) -> None:
    path = built.root / script
    assert path.read_text().startswith(f"#!/usr/bin/python3 {flags}\n")
    result = _run([str(path), "--version"], env=_layout_env(built))  # through its shebang
    assert (result.returncode, result.stdout.strip()) == (0, expected), result.stderr
    # The same search path imports the scratch root's copy (cwd away from the checkout).
    where = _run(["/usr/bin/python3", "-s", "-c", "import efsplug; print(efsplug.__file__)"],
                 env=_layout_env(built), cwd=built.root)
    assert where.stdout.strip() == f"{built.root}{SITELIB}/efsplug/__init__.py"


def test_mount_efs_finds_its_package_and_then_site_without_a_search_path(built: Built) -> None:
    """The installed mount.efs, as the system Python runs it: no PYTHONPATH, no site at
    start; its package comes from the line it appends, the dependencies from site.main()."""
    # What the benchmarks time as "installed by the RPM" is this very script.
    assert (built.root / "sbin/mount.efs").read_text() == rpmform.entry_script("/usr/bin/python3", SITELIB)
    probe = ("import sys; sys.path.append(%r); import efsplug.helper as h; before = list(sys.path); "
             "h._complete_python(); print(sys.flags.no_site, len(sys.path) > len(before))" % f"{built.root}{SITELIB}")
    result = _run(["/usr/bin/python3", "-sS", "-c", probe], cwd=built.root)
    assert result.stdout.split() == ["1", "True"], result.stderr


# --- the units --------------------------------------------------------------------------

def _unit(built: Built, name: str) -> Path:
    where = "etc/systemd/system" if name == "amazon-ecs-volume-plugin.service" else "usr/lib/systemd/system"
    return built.root / where / name


def _settings(path: Path) -> Dict[str, List[str]]:
    settings: Dict[str, List[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _verifiable_copy(built: Built, name: str, tmp_path: Path, executable: str) -> Path:
    """The installed unit with ExecStart pointing into the scratch root: systemd-analyze
    checks that the executable exists (`--root` needs a whole systemd tree, the scratch
    root has none)."""
    text = _unit(built, name).read_text().replace("ExecStart=/usr/bin/efsplug ", f"ExecStart={executable} ")
    copy = tmp_path / name
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_passes(built: Built, name: str, tmp_path: Path) -> None:
    copy = _verifiable_copy(built, name, tmp_path, f"{built.root}/usr/bin/efsplug")
    result = _run(["systemd-analyze", "verify", "--man=no", str(copy)])
    assert (result.returncode, result.stderr) == (0, "")
    # The check is real: the same unit with a missing program fails.
    broken = _verifiable_copy(built, name, tmp_path, f"{built.root}/usr/bin/missing")
    failed = _run(["systemd-analyze", "verify", "--man=no", str(broken)])
    assert failed.returncode != 0 and "missing" in failed.stderr


# Settings that would give the service its own mount namespace (mounts would not reach
# the host; a private copy of the mount table pins docker's mounts) or cut its network.
FORBIDDEN = ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "PrivateNetwork",
             "PrivateMounts", "MountFlags", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
             "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables",
             "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
             "ProcSubset", "ProtectHostname", "PrivateUsers", "IPAddressDeny", "NoNewPrivileges",
             "DynamicUser", "User", "RootDirectory")


@pytest.mark.parametrize("name, command", [(UNITS[0], "agent"), (UNITS[1], "supervise")])
def test_units_keep_tunnels_and_mounts_working(built: Built, name: str, command: str) -> None:
    s = _settings(_unit(built, name))
    assert s["ExecStart"] == [f"/usr/bin/efsplug {command}"]
    assert s["KillMode"] == ["process"] and s["Restart"] == ["on-failure"]
    assert s["Wants"] == s["After"] == ["network-online.target"]
    assert s["StandardOutput"] == ["journal"] and s["WantedBy"] == ["multi-user.target"]
    assert [key for key in FORBIDDEN if key in s] == []
    assert s["RestrictNamespaces"] == ["net mnt"]  # setns into task network namespaces
    assert "CAP_SYS_ADMIN" in s["CapabilityBoundingSet"][0].split()
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0].split()
    if name == UNITS[0]:
        assert s["Before"] == ["docker.service"]
        assert s["Conflicts"] == ["amazon-ecs-volume-plugin.socket"]
    else:
        assert s["Conflicts"] == ["amazon-ecs-volume-plugin.service"]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_security_exposure_is_medium_at_worst(built: Built, name: str, tmp_path: Path) -> None:
    copy = _verifiable_copy(built, name, tmp_path, f"{built.root}/usr/bin/efsplug")
    result = _run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(copy)])
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level, result.stdout + result.stderr
    print(f"{name}: exposure {level.group(1)} (an unhardened service scores 9.6)")
    assert float(level.group(1)) <= 6.5


# --- the scriptlets, exactly as rpm would run them ---------------------------------------

def _scriptlet(rpm: Path, tag: str) -> str:
    body = _run(["rpm", "-qp", "--qf", f"%{{{tag}}}", str(rpm)]).stdout
    assert body and body != "(none)", tag
    return body


FAKED = ("systemctl", "systemd-tmpfiles", "umount")


def _fake_bin(directory: Path) -> Path:
    """systemctl, systemd-tmpfiles and umount that only log their calls to $LOG."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in FAKED:
        fake = directory / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*" >> "$LOG"\n')
        fake.chmod(0o755)
    return directory


def _run_scriptlet(body: str, arg: int, tmp_path: Path) -> Tuple[subprocess.CompletedProcess, List[str]]:
    log = tmp_path / f"calls-{arg}"
    log.write_text("")
    env = {**os.environ, "LOG": str(log), "PATH": f"{_fake_bin(tmp_path / 'bin')}:/usr/bin:/bin"}
    result = _run(["/bin/sh", "-e", "-c", body, "scriptlet", str(arg)], env=env)
    assert result.returncode == 0, result.stderr
    return result, log.read_text().splitlines()


BOTH = " ".join(UNITS)


def test_upgrade_try_restarts_and_touches_no_mount(built: Built, tmp_path: Path) -> None:
    _, calls = _run_scriptlet(_scriptlet(built.rpm, "POSTUN"), 1, tmp_path)
    assert calls == ["systemctl daemon-reload", f"systemctl try-restart {BOTH}"]
    _, calls = _run_scriptlet(_scriptlet(built.rpm, "PREUN"), 1, tmp_path)
    assert calls == []  # the old package's %preun on upgrade: nothing is stopped


def test_erase_stops_and_disables_and_unmounts_nothing(built: Built, tmp_path: Path) -> None:
    result, calls = _run_scriptlet(_scriptlet(built.rpm, "PREUN"), 0, tmp_path)
    assert calls == [f"systemctl --no-reload disable --now {BOTH}"]
    if "127.0.0.1:" not in Path("/proc/mounts").read_text():  # no tunnelled mount here
        assert result.stdout == ""
    _, calls = _run_scriptlet(_scriptlet(built.rpm, "POSTUN"), 0, tmp_path)
    assert calls == ["systemctl daemon-reload"]


def test_first_install_creates_the_state_dir_and_applies_presets(built: Built, tmp_path: Path) -> None:
    _, calls = _run_scriptlet(_scriptlet(built.rpm, "POSTIN"), 1, tmp_path)
    assert calls == ["systemd-tmpfiles --create /usr/lib/tmpfiles.d/efsplug.conf",
                     f"systemctl --no-reload preset {BOTH}"]


@pytest.mark.guest
def test_erase_lists_a_live_tls_mount_and_leaves_it_mounted(built: Built, clean_guest) -> None:
    bed = clean_guest
    mountpoint = "/mnt/packaging-erase"
    mounted = bed.mount_efs(mountpoint, "tls")
    assert mounted.rc == 0, mounted.stderr
    try:
        fakes = _fake_bin(bed.workdir / "packaging" / "bin")  # the bed workdir is shared
        log = bed.workdir / "packaging" / "calls"
        log.write_text("")
        result = bed.run(["sh", "-e", "-c", _scriptlet(built.rpm, "PREUN"), "scriptlet", "0"], timeout=30,
                         env={"LOG": str(log), "PATH": f"{fakes}:/usr/sbin:/usr/bin:/sbin:/bin"})
        assert result.rc == 0, result.stderr
        assert "efsplug: these EFS mounts stay mounted" in result.stdout
        assert f"  {mountpoint}\n" in result.stdout
        calls = log.read_text().splitlines()
        assert calls == [f"systemctl --no-reload disable --now {BOTH}"]
        still = bed.run(["sh", "-c", f"grep -c ' {mountpoint} nfs4 ' /proc/mounts"]).stdout.strip()
        assert still == "1"
        assert bed.run(["ls", mountpoint], timeout=30).rc == 0  # and it still answers
    finally:
        assert bed.run(["umount", mountpoint], timeout=60).rc == 0
