"""How long a mount whose task is gone (or whose volume is unreferenced) stays mounted.

The ECS agent removes a stopped task's containers and volumes after
ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION (Go duration syntax, default 3h; anything under 1s,
or unparsable, means the default) plus a random 0..ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER.
The supervisor waits as long, so a mount never disappears before ECS would remove it.

Where the wait comes from, first found wins:
1. `[mount-watchdog] cleanup_wait_sec` in efs-utils.conf;
2. the process environment (an explicit override, e.g. a systemd drop-in);
3. /etc/ecs/ecs.config ($EFSPLUG_ECS_CONFIG), where operators set it for the ECS agent;
4. the ECS agent's 3h default.
Steps 2 and 3 go name by name: the jitter may come from one, the wait from the other.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from typing import Callable, List, Mapping, Optional, Tuple

from efsplug.config import Config
from efsplug.ecsconfig import EcsConfig
from efsplug.errors import shown

WAIT_ENV = "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION"
JITTER_ENV = "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER"
NAMES = (WAIT_ENV, JITTER_ENV)
DEFAULT_WAIT = 3 * 3600.0
MINIMUM_WAIT = 1.0
NO_ECS_CONFIG = EcsConfig("<none>")
IN_ENVIRONMENT = "the process environment"
DEFAULT_SOURCE = "the ECS agent's default"

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("1h30m", "500ms", "-2s", "0"); ValueError if malformed."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = -1.0 if s[0] == "-" else 1.0
    if s[0] in "+-":
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Go-like and short: 3h, 1h30m, 10m32.5s, 0.25s."""
    if seconds <= 0:
        return "0s"
    hours, rest = divmod(round(seconds, 3), 3600.0)
    minutes, secs = divmod(rest, 60.0)
    parts = [f"{int(hours)}h" if hours else "", f"{int(minutes)}m" if minutes else "",
             f"{secs:.3f}".rstrip("0").rstrip(".") + "s" if secs else ""]
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class CleanupWait:
    """The wait in force, where it came from, and why other settings were not used."""

    base: float
    source: str  # printable: a name and a file, never a value of another key
    jitter_max: float = 0.0
    jitter_source: str = ""
    jitter: Optional[float] = None  # drawn once per supervisor; None: not drawn
    notes: Tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return self.base + (self.jitter or 0.0)

    def describe(self) -> str:
        """`5s (ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION in /etc/ecs/ecs.config)`."""
        base = f"{format_duration(self.base)} ({self.source})"
        if self.jitter_max <= 0:
            return base
        most = f"{format_duration(self.jitter_max)} ({self.jitter_source})"
        if self.jitter is None:
            return f"{base} plus a jitter of up to {most}"
        return f"{format_duration(self.seconds)} = {base} plus a jitter of {format_duration(self.jitter)} of up to {most}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Optional["CleanupWait"]:
        """What a supervisor published, or None if it is not that (old version, torn read)."""
        try:
            d = json.loads(text)
            jitter = d["jitter"]
            wait = cls(base=float(d["base"]), source=str(d["source"]), jitter_max=float(d["jitter_max"]),
                       jitter_source=str(d["jitter_source"]), jitter=None if jitter is None else float(jitter),
                       notes=tuple(str(n) for n in d["notes"]))
        except (ValueError, KeyError, TypeError, OverflowError):
            return None
        numbers = (wait.base, wait.jitter_max, wait.jitter or 0.0)
        return wait if all(math.isfinite(n) and n >= 0 for n in numbers) else None


@dataclass(frozen=True)
class _Found:
    text: str
    where: str  # "NAME in FILE line N" / "NAME in the process environment"
    exact: bool  # from ecs.config: the ECS agent parses it as written, spaces included


def _find(name: str, environ: Mapping[str, str], ecs: EcsConfig) -> Optional[_Found]:
    raw = environ.get(name)
    if raw is not None and raw.strip():
        return _Found(raw, f"{name} in {IN_ENVIRONMENT}", exact=False)
    setting = ecs.get(name)
    if setting is not None and setting.value:  # empty: the agent treats it as unset
        return _Found(setting.value, f"{name} in {ecs.source} line {setting.line}", exact=True)
    return None


def _duration(found: _Found) -> Optional[float]:
    if found.exact and found.text != found.text.strip():
        return None  # Go's time.ParseDuration refuses surrounding spaces
    try:
        return parse_go_duration(found.text)
    except ValueError:
        return None  # like the agent: an unparsable value means "not set"


def cleanup_wait(
    config: Config,
    environ: Mapping[str, str],
    ecs: EcsConfig = NO_ECS_CONFIG,
    *,
    rand: Optional[Callable[[float, float], float]] = random.uniform,
) -> CleanupWait:
    """The wait before unmounting a mount whose task is gone; jitter drawn once (rand None: not drawn)."""
    if config.watchdog.cleanup_wait_sec is not None:
        return CleanupWait(float(config.watchdog.cleanup_wait_sec),
                           f"[mount-watchdog] cleanup_wait_sec in {config.source}")
    notes: List[str] = list(ecs.warnings)
    base, source = DEFAULT_WAIT, DEFAULT_SOURCE
    found = _find(WAIT_ENV, environ, ecs)
    if found is not None:
        value = _duration(found)
        if value is not None and value >= MINIMUM_WAIT:
            base, source = value, found.where
        else:
            why = "is not a Go duration" if value is None else "is under 1s"
            notes.append(f"{found.where}: {shown(found.text)} {why}, so the ECS agent's 3h default applies")
    jitter_max, jitter_source = 0.0, ""
    found = _find(JITTER_ENV, environ, ecs)
    if found is not None:
        value = _duration(found)
        if value is None:
            notes.append(f"{found.where}: {shown(found.text)} is not a Go duration, so there is no jitter")
        elif value > 0:
            jitter_max, jitter_source = value, found.where
    jitter = rand(0.0, jitter_max) if jitter_max > 0 and rand is not None else None
    return CleanupWait(base, source, jitter_max, jitter_source, jitter, tuple(notes))
