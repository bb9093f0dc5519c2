"""Which kernel the bed boots: the probe, the fall-back, the forced choice, the clear failures.

The probes boot the real kernels (about a second each). Only the choice between kernels is
ever given a kernel that cannot boot, and that one is a real program that exits at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from efsbed import kernel, procs
from efsbed.guest import Guest, GuestError

AMX_PANIC = (
    "Run /work/main/tests/efsbed/guest_init.py as init process\n"
    "userspace - ptrace set fp regs failed, errno = 14\n"
    "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n"
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "kernel-probe.json"
    monkeypatch.setattr(kernel, "CACHE", path)
    kernel.select.cache_clear()
    yield path
    kernel.select.cache_clear()


def _unbootable(name: str) -> kernel.Kernel:
    """A real kernel record whose binary is /bin/false: it exits before any init runs."""
    return dataclasses.replace(kernel.FACTORIES[name](), binary=Path("/bin/false"))


def test_boot_failure_names_the_amx_panic() -> None:
    assert kernel.boot_failure(AMX_PANIC) == "userspace - ptrace set fp regs failed, errno = 14"
    assert kernel.boot_failure("", timed_out=True) == "init did not run within the time limit"
    assert kernel.boot_failure("a\nlast words\n\n") == "the kernel stopped: last words"


@pytest.mark.parametrize("value", ["debian13", "UML7", "../x"])
def test_an_unknown_forced_kernel_is_one_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                      value: str) -> None:
    monkeypatch.setenv(kernel.ENV, value)
    with pytest.raises(kernel.KernelError, match=r"is not a kernel of the bed; use one of debian12, uml7$"):
        kernel.select()


@pytest.mark.parametrize("name", kernel.NAMES)
def test_forcing_a_kernel_selects_it(cache: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(kernel.ENV, name)
    chosen = kernel.select()
    assert chosen.name == name and chosen.binary.is_file()
    assert (chosen.modules / "kernel/fs/nfs/nfsv4.ko").is_file()
    assert kernel.summary().endswith(f"forced by {kernel.ENV}")
    assert name not in kernel.others()


@pytest.mark.guest
@pytest.mark.parametrize("name", kernel.NAMES)
def test_probe_boots_each_kernel_unless_the_cpu_has_amx(name: str) -> None:
    failure = kernel.probe(kernel.by_name(name))
    if name == "debian12" and kernel.cpu_has_amx():
        assert failure is not None and "ptrace set fp regs failed" in failure
    else:
        assert failure is None


@pytest.mark.guest
def test_probe_verdict_is_cached_per_kernel(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = kernel.uml7()
    assert kernel.cached_probe(k) is None and k.name in cache.read_text()

    def no_second_boot(_: kernel.Kernel) -> str:
        raise AssertionError("a cached verdict must not boot the kernel again")

    monkeypatch.setattr(kernel, "probe", no_second_boot)
    assert kernel.cached_probe(k) is None


@pytest.mark.guest
def test_default_falls_back_to_the_newer_kernel(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernel.ENV, raising=False)
    broken = _unbootable("debian12")
    monkeypatch.setitem(kernel.FACTORIES, "debian12", lambda: broken)
    assert kernel.default().name == "uml7"
    assert not cache.read_text().count("debian12")  # a failed probe is never remembered


def test_no_bootable_kernel_is_one_line_naming_each_attempt(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in kernel.NAMES:
        broken = _unbootable(name)
        monkeypatch.setitem(kernel.FACTORIES, name, lambda broken=broken: broken)
    with pytest.raises(kernel.KernelError) as err:
        kernel.default()
    message = str(err.value)
    assert "\n" not in message and message.startswith("no user-mode Linux kernel boots on this machine")
    assert "debian12 (Linux 6.1" in message and "uml7 (Linux 7." in message
    assert message.count("the kernel stopped") == 2


def test_a_missing_kernel_names_the_fix(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernel, "UML7_DIR", tmp_path / "nothing-here")
    with pytest.raises(kernel.KernelError, match=r"uml7: .*linux.uml is missing; run scripts/lib/setup-host"):
        kernel.uml7()


@pytest.mark.guest
def test_a_failed_guest_setup_is_one_clear_line(tmp_path: Path) -> None:
    """init checks the module tree it is given; a wrong one powers off with a named cause."""
    tag = procs.new_tag()
    wrong = dataclasses.replace(kernel.select(), modules=Path("/usr/lib/uml/modules/0.0.0"))
    g = Guest(tmp_path, tag=tag, kernel=wrong)
    with pytest.raises(GuestError) as err:
        g.start(timeout=60)
    first = str(err.value).splitlines()[0]
    assert "powered off before its agent connected" in first
    assert "FATAL during filesystems" in first and "is not for this kernel" in first
    assert procs.tagged_processes(tag) == []
