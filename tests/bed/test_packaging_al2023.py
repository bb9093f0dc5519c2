"""The RPM on Amazon Linux 2023, decided by rpm itself in scratch roots.

AL2023 is played by a stand-in package that provides what AL2023's repositories provide
(the names and versions in AL2023 below), amazon-efs-utils 3.2 and 2.1 by stand-ins that
own efs-utils' paths as its AL2023 builds lay them out. Each is built here by rpmbuild from
a spec written by the test and installed with `rpm --root` into a merged-/usr root (as
AL2023's: /sbin is usr/sbin), rpm's database inside the root; no scriptlet runs.
"""

from __future__ import annotations

import configparser
import importlib
import pkgutil
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from efsplug import __version__

REPO = Path(__file__).resolve().parents[2]
DB = "/rpmdb"  # inside each root

# AL2023's packages efsplug may need: name -> (EVR, further provides). Python 3.9 and the
# library versions are the ones scripts/test runs the suite against (.venv-al2023).
AL2023: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "python3": ("3.9.16-1.amzn2023.0.9", ("python(abi) = 3.9", "python3.9 = 3.9.16", "/usr/bin/python3")),
    "python3-botocore": ("1.31.85-1.amzn2023.0.1", ("python3.9dist(botocore) = 1.31.85",)),
    "python3-cryptography": ("36.0.1-1.amzn2023.0.4", ("python3.9dist(cryptography) = 36.0.1",)),
    "python3-psutil": ("5.8.0-12.amzn2023.0.3", ("python3.9dist(psutil) = 5.8",)),
    "nfs-utils": ("1:2.5.4-2.rc3.amzn2023.0.3", ()),
    "stunnel": ("5.58-1.amzn2023.0.2", ()),  # AL2023's name; stunnel5 is Amazon Linux 2's
    "systemd": ("252.23-2.amzn2023", ()),
    "ca-certificates": ("2023.2.64-1.amzn2023.0.1", ()),
    "bash": ("5.2.15-1.amzn2023.0.2", ("/bin/sh", "/bin/bash")),
    "gawk": ("5.1.0-3.amzn2023.0.3", ("/usr/bin/awk",)),  # %preun lists mounts with awk
}
# What rpm 4.16 (AL2023's) can install; `rpm --showrc` lists a release's features.
RPM_416_FEATURES = {
    "BuiltinLuaScripts", "CaretInVersions", "CompressedFileNames", "ConcurrentAccess",
    "DynamicBuildRequires", "ExplicitPackageProvide", "FileCaps", "FileDigests",
    "HeaderLoadSortsTags", "LargeFiles", "PartialHardlinkSets", "PayloadFilesHavePrefix",
    "PayloadIsBzip2", "PayloadIsLzma", "PayloadIsXz", "PayloadIsZstd", "RichDependencies",
    "ScriptletExpansion", "ScriptletInterpreterArgs", "TildeInVersions", "VersionedDependencies",
}
PYPI_TO_AL2023 = {"botocore": "python3-botocore", "cryptography": "python3-cryptography", "psutil": "python3-psutil"}


def _run(argv: Sequence[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)


def _vercmp(a: str, b: str) -> int:
    """rpm's own version comparison (rpmdev-vercmp is not on every build host)."""
    out = _run(["rpm", "--eval", f'%{{lua: print(rpm.vercmp("{a}", "{b}"))}}'])
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


# --- stand-in packages ---------------------------------------------------------------------

@dataclass(frozen=True)
class File:
    mode: int
    content: str = ""
    config: bool = False


def standin(work: Path, name: str, evr: str, provides: Sequence[str] = (),
            files: Optional[Dict[str, File]] = None) -> Path:
    """rpmbuild a noarch package `name` at `evr` that provides and owns what it is told."""
    files = files or {}
    epoch, _, rest = evr.rpartition(":")
    version, _, release = rest.partition("-")
    top = work / f"build-{name}-{version}"
    payload = top / "payload"
    top.mkdir(parents=True)
    for path, f in files.items():
        target = payload / path.lstrip("/")
        if f.mode & 0o40000:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.content)

    def entry(path: str, f: File) -> str:
        kind = "%dir " if f.mode & 0o40000 else "%config(noreplace) " if f.config else ""
        return f"{kind}%attr({f.mode & 0o7777:04o},root,root) {path}"

    spec = "\n".join([
        f"Name: {name}", f"Version: {version}", f"Release: {release or '1'}",
        *([f"Epoch: {epoch}"] if epoch else []),
        "Summary: stand-in", "License: MIT", "BuildArch: noarch",
        *(f"Provides: {p}" for p in provides),
        "%description", "A stand-in for a test.",
        "%install", f"cp -a {payload}/. %{{buildroot}}/" if files else "mkdir -p %{buildroot}",
        "%files", *(entry(p, f) for p, f in files.items()), "",
    ])
    (top / "name.spec").write_text(spec)
    result = _run(["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}", "--define", f"_dbpath {top}/db",
                   "--define", "__os_install_post %{nil}", "--define", "_build_id_links none",
                   str(top / "name.spec")])
    assert result.returncode == 0, result.stdout + result.stderr
    (rpm,) = (top / "RPMS/noarch").glob(f"{name}-*.noarch.rpm")
    return rpm


def al2023(work: Path, drop: Sequence[str] = (), replace: Optional[Dict[str, Tuple[str, Tuple[str, ...]]]] = None) -> Path:
    """One package providing AL2023's packages (less `drop`, with `replace`d entries)."""
    table = {**{k: v for k, v in AL2023.items() if k not in drop}, **(replace or {})}
    provides = [f"{name} = {evr}" for name, (evr, _) in table.items()]
    provides += [extra for _, extras in table.values() for extra in extras]
    return standin(work, "al2023-repos", "2023.6-1", provides)


def merged_usr_root(base: Path) -> Path:
    root = base / "root"
    for top in ("bin", "sbin", "lib", "lib64"):
        (root / "usr" / top).mkdir(parents=True, exist_ok=True)
        (root / top).symlink_to(f"usr/{top}")
    return root


def rpm_in(root: Path, *args: str) -> subprocess.CompletedProcess:
    result = _run(["rpm", "--root", str(root), "--dbpath", DB, *args])
    # Debian's rpm says first that Debian prefers alien; AL2023's says nothing of the kind.
    said = [line for line in result.stderr.splitlines(keepends=True) if not line.startswith("rpm: ")]
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, "".join(said))


def install(root: Path, *packages: Path) -> None:
    result = rpm_in(root, "-i", "--nodeps", "--noscripts", *map(str, packages))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def built39(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rpm39")
    result = _run([str(REPO / "scripts/build-rpm"), "--outdir", str(out), "--python-version", "3.9"], timeout=300)
    assert result.returncode == 0, f"build-rpm failed:\n{result.stdout}\n{result.stderr}"
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return al2023(tmp_path_factory.mktemp("al2023"))


def _query(rpm: Path, what: str) -> List[str]:
    return _run(["rpm", "-qp", f"--{what}", str(rpm)]).stdout.splitlines()


# --- item: the package installs from AL2023's repositories alone -----------------------------

def test_every_require_is_met_by_al2023_or_the_package_itself(built39: Path, repos: Path, tmp_path: Path) -> None:
    requires = _query(built39, "requires")
    assert "python(abi) = 3.9" in requires and not [r for r in requires if "pyroute2" in r], requires
    features = {m.group(1) for r in requires if (m := re.match(r"rpmlib\((\w+)\)", r))}
    assert features and features <= RPM_416_FEATURES, features - RPM_416_FEATURES
    root = merged_usr_root(tmp_path)
    install(root, repos)
    # rpm's own dependency check (versions, rich dependencies, file requires), no --nodeps.
    result = rpm_in(root, "-i", "--test", str(built39))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@pytest.mark.parametrize("drop, replace, missing", [
    (["python3-psutil"], {}, "python3-psutil is needed"),
    (["stunnel"], {}, "(stunnel5 or stunnel) is needed"),
    (["bash"], {}, "/bin/sh is needed"),
    ([], {"python3": ("3.11.6-1", ("python(abi) = 3.11", "/usr/bin/python3"))}, "python(abi) = 3.9 is needed"),
], ids=["psutil", "stunnel", "sh", "python 3.11"])
def test_the_check_is_real_a_missing_package_fails_it(built39: Path, tmp_path: Path, drop, replace, missing) -> None:
    root = merged_usr_root(tmp_path)
    install(root, al2023(tmp_path, drop, replace))
    result = rpm_in(root, "-i", "--test", str(built39))
    assert result.returncode != 0 and missing in result.stderr, result.stderr


def test_setup_cfg_minimums_are_met_by_al2023s_versions() -> None:
    # What Fedora-style builds turn into python3.9dist() requires, and what pip checks.
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    wanted = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    assert {re.match(r"[\w.-]+", w).group(0) for w in wanted} == set(PYPI_TO_AL2023), wanted
    for requirement in wanted:
        name, minimum = re.fullmatch(r"([\w.-]+)>=([\d.]+)", requirement).groups()
        evr = AL2023[PYPI_TO_AL2023[name]][0]
        assert _vercmp(evr.split("-")[0], minimum) >= 0, (requirement, evr)
    assert _vercmp("1.31.85", "1.29") == 1 and _vercmp("36.0.1", "36.0.10") == -1  # a real compare


def test_every_module_imports_on_this_interpreter() -> None:
    # In scripts/test's last pass: Python 3.9 with AL2023's libraries, modules no test reaches too.
    import efsplug

    names = [m.name for m in pkgutil.walk_packages(efsplug.__path__, "efsplug.")]
    assert len(names) > 30
    for name in names:
        importlib.import_module(name)


# --- item: amazon-efs-utils 3.x is kept, 2.x replaced ------------------------------------------

EDITED = "# edited by the operator\n[mount]\nregion = eu-west-1\n"


def efs_utils(work: Path, version: str) -> Path:
    """amazon-efs-utils as AL2023 builds lay it out (efs_bindir /usr/sbin); 3.x adds S3 Files."""
    exe, plain, conf, d = File(0o755, "#!/bin/sh\n"), File(0o644, "# module\n"), File(0o644, "[mount]\n", True), File(0o40755)
    files = {
        "/usr/sbin/mount.efs": exe, "/usr/sbin/efs-proxy": exe, "/usr/bin/amazon-efs-mount-watchdog": exe,
        "/usr/lib/systemd/system/amazon-efs-mount-watchdog.service": plain,
        "/etc/amazon": d, "/etc/amazon/efs": d, "/etc/amazon/efs/efs-utils.conf": conf,
        "/etc/amazon/efs/efs-utils.crt": File(0o444, "cert\n"),
        "/var/log/amazon": d, "/var/log/amazon/efs": d,
        "/usr/share/man/man8/mount.efs.8.gz": plain,
    }
    if version.startswith("3"):
        files.update({
            "/usr/sbin/mount.s3files": exe, "/usr/sbin/efs_utils_common/__init__.py": plain,
            "/usr/sbin/mount_efs/__init__.py": plain, "/usr/sbin/mount_s3files/__init__.py": plain,
            "/etc/amazon/efs/s3files-utils.conf": conf, "/usr/share/man/man8/mount.s3files.8.gz": plain,
        })
    return standin(work, "amazon-efs-utils", f"{version}-1.amzn2023", files=files)


def _owner(root: Path, path: str) -> str:
    return rpm_in(root, "-qf", "--qf", "%{NAME}-%{VERSION}", path).stdout.strip()


def _host_with(work: Path, repos: Path, version: str) -> Path:
    root = merged_usr_root(work)
    install(root, repos, efs_utils(work, version))
    for conf in ("efs-utils.conf", "s3files-utils.conf"):
        if (root / "etc/amazon/efs" / conf).exists():
            (root / "etc/amazon/efs" / conf).write_text(EDITED)  # the operator's settings
    return root


def test_efs_utils_3_is_kept_and_the_install_stops_naming_it(built39: Path, repos: Path, tmp_path: Path) -> None:
    root = _host_with(tmp_path, repos, "3.2")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and DB.strip("/") not in p.parts}
    result = rpm_in(root, "-U", str(built39))  # as dnf would: with the dependency check
    assert result.returncode != 0
    # One reason, the dependency check's, before any file is looked at.
    assert result.stderr.splitlines() == [
        "error: Failed dependencies:", f"\tamazon-efs-utils >= 3 conflicts with efsplug-{__version__}-1.noarch"]
    assert rpm_in(root, "-q", "efsplug").returncode != 0
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and DB.strip("/") not in p.parts}
    assert after == before  # nothing written, edited configs included
    for path in ("/sbin/mount.efs", "/usr/sbin/mount.s3files", "/usr/sbin/efs-proxy", "/etc/amazon/efs/s3files-utils.conf"):
        assert _owner(root, path) == "amazon-efs-utils-3.2", path


def _erase_and_install(root: Path, erase: str, package: Path) -> subprocess.CompletedProcess:
    """One rpm transaction erasing `erase` and installing `package`, as `dnf install
    --allowerasing` runs it (python3-rpm, the bindings dnf uses); no scriptlets."""
    script = """
import os, sys, rpm
root, db, erase, path = sys.argv[1:]
rpm.addMacro("_dbpath", db)
ts = rpm.TransactionSet(root)
with open(path, "rb") as f:
    ts.addInstall(ts.hdrFromFdno(f.fileno()), path, "u")
ts.addErase(erase)
assert not ts.check(), ts.check()
ts.order()
ts.setFlags(rpm.RPMTRANS_FLAG_NOSCRIPTS | rpm.RPMTRANS_FLAG_NOTRIGGERS)
files = {}
def callback(what, amount, total, key, data):
    if what == rpm.RPMCALLBACK_INST_OPEN_FILE:
        files[key] = os.open(key, os.O_RDONLY)
        return files[key]
    if what == rpm.RPMCALLBACK_INST_CLOSE_FILE:
        os.close(files.pop(key))
problems = ts.run(callback, "")
sys.exit(f"transaction failed: {problems}" if problems else 0)
"""
    return _run(["/usr/bin/python3", "-c", script, str(root), DB, erase, str(package)])


def test_the_way_out_for_a_host_without_s3_files(built39: Path, repos: Path, tmp_path: Path) -> None:
    """docs/install.md: `dnf install --allowerasing`: efs-utils goes in the same transaction."""
    root = _host_with(tmp_path, repos, "3.2")
    result = _erase_and_install(root, "amazon-efs-utils", built39)
    assert result.returncode == 0, result.stdout + result.stderr
    efs = root / "etc/amazon/efs"
    assert _owner(root, "/sbin/mount.efs") == _owner(root, "/usr/sbin/mount.efs") == f"efsplug-{__version__}"
    assert "efsplug.helper" in (root / "usr/sbin/mount.efs").read_text()
    assert (efs / "efs-utils.conf").read_text() == EDITED  # the operator's file stays in force
    assert (efs / "efs-utils.conf.rpmnew").read_text() == (REPO / "rpm/efs-utils.conf").read_text()
    # S3 Files leaves with efs-utils: its helper and program go, its edited config is saved.
    assert not (root / "usr/sbin/mount.s3files").exists() and not (root / "usr/sbin/efs-proxy").exists()
    assert (efs / "s3files-utils.conf.rpmsave").read_text() == EDITED


def test_efs_utils_2_is_replaced_in_one_upgrade(built39: Path, repos: Path, tmp_path: Path) -> None:
    root = _host_with(tmp_path, repos, "2.1")
    result = rpm_in(root, "-U", "--noscripts", str(built39))  # Obsoletes: dnf upgrades it so
    assert (result.returncode, result.stderr) == (
        0, "warning: /etc/amazon/efs/efs-utils.conf created as /etc/amazon/efs/efs-utils.conf.rpmnew\n")
    assert rpm_in(root, "-q", "amazon-efs-utils").returncode != 0
    # Same file under both names (merged /usr): efsplug's, not erased with the old package.
    assert _owner(root, "/usr/sbin/mount.efs") == f"efsplug-{__version__}"
    assert "efsplug.helper" in (root / "sbin/mount.efs").read_text()
    efs = root / "etc/amazon/efs"
    assert (efs / "efs-utils.conf").read_text() == EDITED
    assert (efs / "efs-utils.conf.rpmnew").read_text() == (REPO / "rpm/efs-utils.conf").read_text()
    assert not (root / "usr/bin/amazon-efs-mount-watchdog").exists()


def test_scriptlets_never_touch_efs_utils_processes(built39: Path) -> None:
    scripts = _run(["rpm", "-qp", "--scripts", str(built39)]).stdout
    assert scripts.strip()
    for word in ("kill", "efs-proxy", "stunnel", "watchdog", "amazon-efs"):
        assert word not in scripts, word
