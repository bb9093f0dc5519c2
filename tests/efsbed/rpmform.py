"""mount.efs as the RPM installs it, for the benchmarks: the system Python started with
-sS, and the efsplug package (compiled) in a site directory that the entry script appends,
exactly the script rpm/efsplug.spec writes (test_packaging.py compares the two).

This checkout's own .venv/bin/mount.efs pays for the editable install's import hook and
for site on every start, which an installed mount.efs does not.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from efsbed.bed import REPO

SYSTEM_PYTHON = "/usr/bin/python3"


def entry_script(python: str, sitelib: str) -> str:
    return f'#!{python} -sS\nimport sys\nsys.path.append("{sitelib}")\nfrom efsplug.helper import main\nsys.exit(main())\n'


def install(target: Path, python: str = SYSTEM_PYTHON) -> Path:
    """The package and the entry script under target; the entry script's path."""
    sitelib = target / "site-packages"
    shutil.copytree(REPO / "efsplug", sitelib / "efsplug", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([python, "-m", "compileall", "-q", str(sitelib)], check=True, stdout=subprocess.DEVNULL)
    entry = target / "mount.efs"
    entry.write_text(entry_script(python, str(sitelib)))
    entry.chmod(0o755)
    return entry
