"""How long a mount whose task is gone (or whose volume is unreferenced) stays mounted.

The ECS agent removes a stopped task's containers and volumes after
ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION (Go duration syntax, default 3h; anything under 1s,
or unparsable, means the default) plus a random 0..ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER.
The supervisor waits as long, so a mount never disappears before ECS would remove it.
`[mount-watchdog] cleanup_wait_sec` in efs-utils.conf overrides both.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Mapping, Optional

from efsplug.config import Config

WAIT_ENV = "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION"
JITTER_ENV = "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER"
DEFAULT_WAIT = 3 * 3600.0
MINIMUM_WAIT = 1.0

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


def _env_duration(environ: Mapping[str, str], name: str) -> Optional[float]:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return parse_go_duration(raw)
    except ValueError:
        return None  # like the agent: an unparsable value means "not set"


def cleanup_wait(
    config: Config,
    environ: Mapping[str, str],
    *,
    rand: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait before unmounting a mount whose task is gone; jitter drawn once."""
    if config.watchdog.cleanup_wait_sec is not None:
        return float(config.watchdog.cleanup_wait_sec)
    wait = _env_duration(environ, WAIT_ENV)
    if wait is None or wait < MINIMUM_WAIT:
        wait = DEFAULT_WAIT
    jitter = _env_duration(environ, JITTER_ENV)
    if jitter is not None and jitter > 0:
        wait += rand(0.0, jitter)
    return wait
