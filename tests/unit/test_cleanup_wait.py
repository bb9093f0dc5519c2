"""cleanup_wait: Go durations, the ECS agent's default and floor, jitter, the config override."""

from __future__ import annotations

import pytest

from efsplug.config import parse_config
from efsplug.supervisor.cleanup import DEFAULT_WAIT, cleanup_wait, format_duration, parse_go_duration

DEFAULTS = parse_config("").config


@pytest.mark.parametrize("text, seconds", [
    ("3h", 10800.0), ("90m", 5400.0), ("45s", 45.0), ("1h30m", 5400.0), ("500ms", 0.5),
    ("1.5h", 5400.0), ("2h45m30.5s", 9930.5), ("0", 0.0), ("-2s", -2.0), ("+3s", 3.0),
    ("100us", 1e-4), ("7µs", 7e-6), ("10ns", 1e-8), (".5s", 0.5), ("3.s", 3.0),
])
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "3", "h", "3x", "3 h", "1h 30m", ".s", "-", "3hh", "1d", "+"])
def test_malformed_durations(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


def no_jitter(low: float, high: float) -> float:
    raise AssertionError("no jitter expected")


@pytest.mark.parametrize("env, expected", [
    ({}, DEFAULT_WAIT),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "45s"}, 45.0),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "1h30m"}, 5400.0),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "1s"}, 1.0),
    # Under the agent's 1 s floor, zero, negative or unparsable: the default.
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "500ms"}, DEFAULT_WAIT),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "0"}, DEFAULT_WAIT),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "-5m"}, DEFAULT_WAIT),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "soon"}, DEFAULT_WAIT),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "  "}, DEFAULT_WAIT),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER": "garbage"}, DEFAULT_WAIT),
    ({"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER": "0s"}, DEFAULT_WAIT),
])
def test_wait_from_environment(env, expected):
    assert cleanup_wait(DEFAULTS, env, rand=no_jitter).seconds == expected


def test_jitter_is_added_once_within_bounds():
    calls = []

    def rand(low: float, high: float) -> float:
        calls.append((low, high))
        return high

    env = {"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "10m", "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER": "1m"}
    assert cleanup_wait(DEFAULTS, env, rand=rand).seconds == 660.0
    assert calls == [(0.0, 60.0)]


def test_config_key_overrides_environment():
    config = parse_config("[mount-watchdog]\ncleanup_wait_sec = 7\n").config
    env = {"ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION": "1h", "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER": "1m"}
    assert cleanup_wait(config, env, rand=no_jitter).seconds == 7.0


@pytest.mark.parametrize("seconds, text", [
    (10800, "3h"), (5400, "1h30m"), (632.5, "10m32.5s"), (0.25, "0.25s"), (5, "5s"), (0, "0s"), (59.9996, "1m"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(seconds, abs=1e-3)


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "soon"])
def test_config_key_refuses_bad_values(value):
    from efsplug.errors import ConfigError

    with pytest.raises(ConfigError, match="cleanup_wait_sec"):
        parse_config(f"[mount-watchdog]\ncleanup_wait_sec = {value}\n")


def test_renewal_seconds_key():
    from efsplug.errors import ConfigError

    assert parse_config("[mount-watchdog]\ntls_cert_renewal_interval_sec = 5\n").config.watchdog.tls_cert_renewal_interval_sec == 5
    assert DEFAULTS.watchdog.tls_cert_renewal_interval_sec is None
    with pytest.raises(ConfigError, match="tls_cert_renewal_interval_sec"):
        parse_config("[mount-watchdog]\ntls_cert_renewal_interval_sec = 0\n")
