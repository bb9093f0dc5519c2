"""Checks in dependency order, each bounded, each ending ok, FAIL or skipped (pure).

A check is a function that returns what it found (a short phrase), raises Problem(cause,
fix) when something is wrong, or NotApplicable(why) when it does not apply to these
options. A check whose prerequisite failed is not run: it is skipped, never failed, so
the first failure is the one to fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

from efsplug.bounded import within
from efsplug.errors import EfsplugError

OK, FAIL, SKIPPED = "ok", "FAIL", "skipped"
CHECK_TIMEOUT = 30.0  # any one check; the slow ones (a tunnel, an API call) bound themselves tighter


class Problem(Exception):
    """What is wrong (cause) and what to do about it (fix): one sentence together."""

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(cause)
        self.cause, self.fix = cause, fix


class NotApplicable(Exception):
    """The check does not apply to these options or this host; the message says why."""


@dataclass(frozen=True)
class Check:
    name: str  # short, stable: what --json and the tests key on
    what: str  # what is checked, in words
    run: Callable[[], str]
    needs: Sequence[str] = ()
    timeout: float = CHECK_TIMEOUT
    threaded: bool = True  # False for checks that create things: they must finish their own undo


@dataclass(frozen=True)
class Result:
    name: str
    what: str
    status: str  # ok | FAIL | skipped
    detail: str  # ok: what was found; skipped: why
    cause: str = ""
    fix: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        text = f"{self.status:<7} {self.name}: {self.what}"
        if self.status == FAIL:
            return f"{text}: {self.cause}" + (f"; {self.fix}" if self.fix else "")
        return f"{text} ({self.detail})" if self.detail else text


def run_checks(checks: Sequence[Check], clock: Callable[[], float] = time.monotonic) -> List[Result]:
    """Every check in order; one whose prerequisite failed or was not run is skipped."""
    results: Dict[str, Result] = {}
    for check in checks:
        blocked = _blocked_by(check, results)
        if blocked is not None:
            results[check.name] = Result(check.name, check.what, SKIPPED, f"not run: {blocked}")
            continue
        started = clock()
        results[check.name] = _run_one(check, started, clock)
    return list(results.values())


def _blocked_by(check: Check, results: Dict[str, Result]) -> Optional[str]:
    for need in check.needs:
        done = results.get(need)
        if done is None:
            raise ValueError(f"check {check.name} needs {need}, which does not come before it")
        if done.status == FAIL:
            return f"{need} failed"
        if done.status == SKIPPED and done.detail.startswith("not run"):
            return f"{need} was not run"
    return None


def _run_one(check: Check, started: float, clock: Callable[[], float]) -> Result:
    def result(status: str, detail: str = "", cause: str = "", fix: str = "") -> Result:
        return Result(check.name, check.what, status, detail, cause, fix, round(clock() - started, 3))

    try:
        found = within(check.timeout, check.run) if check.threaded else check.run()
    except Problem as p:
        return result(FAIL, cause=p.cause, fix=p.fix)
    except NotApplicable as n:
        return result(SKIPPED, f"does not apply: {n}")
    except TimeoutError:
        return result(FAIL, cause=f"no answer within {check.timeout:g}s", fix="see the checks before it, and retry")
    except EfsplugError as e:  # the mount path's own error: already a cause and its fix
        return result(FAIL, cause=str(e))
    return result(OK, found)


def failed(results: Sequence[Result]) -> bool:
    return any(r.status == FAIL for r in results)


def as_json(results: Sequence[Result]) -> str:
    return json.dumps({"ok": not failed(results), "checks": [asdict(r) for r in results]}, indent=2)
