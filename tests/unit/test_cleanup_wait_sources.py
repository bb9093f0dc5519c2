"""Where the cleanup wait comes from: efs-utils.conf, then the environment, then ecs.config, then 3h."""

from __future__ import annotations

import json
from typing import Dict, Optional

import pytest
from hypothesis import given, strategies as st

from efsplug.config import parse_config
from efsplug.ecsconfig import EcsConfig, parse_ecs_config
from efsplug.supervisor.cleanup import DEFAULT_WAIT, NAMES, CleanupWait, cleanup_wait

WAIT, JITTER = NAMES
ECS = "/etc/ecs/ecs.config"
CONF = "/etc/amazon/efs/efs-utils.conf"
ENV = "the process environment"
DEFAULT = "the ECS agent's default"
SECRET = "hunter2-registry-token"
DEFAULTS = parse_config("").config
WITH_KEY = parse_config("[mount-watchdog]\ncleanup_wait_sec = 7\n").config


def ecs(text: str) -> EcsConfig:
    return parse_ecs_config(text.encode(), ECS, NAMES)


def no_jitter(low: float, high: float) -> float:
    raise AssertionError("no jitter expected")


def highest(low: float, high: float) -> float:
    return high


@pytest.mark.parametrize("config_key, env, file, seconds, source", [
    (True, {WAIT: "1h"}, f"{WAIT}=5s", 7.0, f"[mount-watchdog] cleanup_wait_sec in {CONF}"),
    (False, {WAIT: "1h"}, f"{WAIT}=5s", 3600.0, f"{WAIT} in {ENV}"),
    (False, {}, f"ECS_CLUSTER=c\n{WAIT}=5s", 5.0, f"{WAIT} in {ECS} line 2"),
    (False, {}, "ECS_CLUSTER=c", DEFAULT_WAIT, DEFAULT),
    (False, {}, "", DEFAULT_WAIT, DEFAULT),
    # A blank variable is unset (as for the agent): ecs.config decides.
    (False, {WAIT: "  "}, f"{WAIT}=5s", 5.0, f"{WAIT} in {ECS} line 1"),
    # ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION= : the agent gets an empty value, i.e. its default.
    (False, {}, f"{WAIT}=", DEFAULT_WAIT, DEFAULT),
])
def test_precedence(config_key: bool, env: Dict[str, str], file: str, seconds: float, source: str) -> None:
    wait = cleanup_wait(WITH_KEY if config_key else DEFAULTS, env, ecs(file), rand=no_jitter)
    assert (wait.seconds, wait.source, wait.notes) == (seconds, source, ())


@pytest.mark.parametrize("env, file, note", [
    # Quotes and a space after '=' reach the ECS agent, which then cannot parse the value.
    ({}, f'{WAIT}="5s"', f"{WAIT} in {ECS} line 1: '\"5s\"' is not a Go duration"),
    ({}, f"{WAIT}='5s'", f"{WAIT} in {ECS} line 1: '\\'5s\\'' is not a Go duration"),
    ({}, f"{WAIT}= 5s", f"{WAIT} in {ECS} line 1: ' 5s' is not a Go duration"),
    ({}, f"{WAIT}=5s # five", f"{WAIT} in {ECS} line 1: '5s # five' is not a Go duration"),
    ({}, f"{WAIT}=500ms", f"{WAIT} in {ECS} line 1: '500ms' is under 1s"),
    # An environment value is an explicit override: a bad one does not fall back to the file.
    ({WAIT: "soon"}, f"{WAIT}=5s", f"{WAIT} in {ENV}: 'soon' is not a Go duration"),
])
def test_a_value_the_agent_cannot_use_means_its_default(env: Dict[str, str], file: str, note: str) -> None:
    wait = cleanup_wait(DEFAULTS, env, ecs(file), rand=no_jitter)
    assert (wait.seconds, wait.source) == (DEFAULT_WAIT, DEFAULT)
    assert wait.notes == (note + ", so the ECS agent's 3h default applies",)


def test_each_name_comes_from_where_it_is_set() -> None:
    wait = cleanup_wait(DEFAULTS, {JITTER: "1m"}, ecs(f"{WAIT}=5s\n{JITTER}=1h\n"), rand=highest)
    assert (wait.base, wait.jitter, wait.seconds) == (5.0, 60.0, 65.0)
    assert (wait.source, wait.jitter_source) == (f"{WAIT} in {ECS} line 1", f"{JITTER} in {ENV}")
    assert wait.describe() == (f"1m5s = 5s ({WAIT} in {ECS} line 1) plus a jitter of 1m of up to 1m ({JITTER} in {ENV})")


def test_jitter_from_ecs_config_on_the_default() -> None:
    wait = cleanup_wait(DEFAULTS, {}, ecs(f"{JITTER}=10m\n"), rand=lambda low, high: 90.0)
    assert wait.seconds == DEFAULT_WAIT + 90.0
    assert wait.describe() == f"3h1m30s = 3h ({DEFAULT}) plus a jitter of 1m30s of up to 10m ({JITTER} in {ECS} line 1)"


def test_a_bad_jitter_is_no_jitter() -> None:
    wait = cleanup_wait(DEFAULTS, {}, ecs(f'{WAIT}=5s\n{JITTER}="1m"\n'), rand=no_jitter)
    assert (wait.seconds, wait.jitter_max) == (5.0, 0.0)
    assert wait.notes == (f"{JITTER} in {ECS} line 2: '\"1m\"' is not a Go duration, so there is no jitter",)


def test_jitter_not_drawn() -> None:
    wait = cleanup_wait(DEFAULTS, {}, ecs(f"{WAIT}=5s\n{JITTER}=1m\n"), rand=None)
    assert (wait.seconds, wait.jitter) == (5.0, None)
    assert wait.describe() == f"5s ({WAIT} in {ECS} line 1) plus a jitter of up to 1m ({JITTER} in {ECS} line 2)"


def test_the_config_key_makes_ecs_config_irrelevant() -> None:
    wait = cleanup_wait(WITH_KEY, {}, ecs(f"broken\n{WAIT}=\"5s\"\n"), rand=no_jitter)
    assert (wait.seconds, wait.notes) == (7.0, ())
    assert wait.describe() == f"7s ([mount-watchdog] cleanup_wait_sec in {CONF})"


def test_notes_name_lines_and_the_two_durations_only() -> None:
    file = f"ECS_ENGINE_AUTH_DATA={SECRET}\n{SECRET}\n{WAIT}={SECRET}\n{WAIT} = 1m\n"
    wait = cleanup_wait(DEFAULTS, {}, ecs(file), rand=no_jitter)
    assert wait.notes == (
        f"{ECS}: line 2 has no '='; ignored",
        f"{ECS}: line 4 has a space around '='; the ECS agent ignores it, and so does efsplug",
        # line 3's value is the wait's own: shown so the operator can see what is wrong with it
        f"{WAIT} in {ECS} line 3: '{SECRET}' is not a Go duration, so the ECS agent's 3h default applies",
    )
    assert sum(SECRET in note for note in wait.notes) == 1


def test_a_hostile_value_is_escaped() -> None:
    wait = cleanup_wait(DEFAULTS, {}, ecs(f"{WAIT}=\x1b[2J5s\n"), rand=no_jitter)
    assert "\x1b" not in wait.notes[0] and "\\x1b[2J5s" in wait.notes[0]


def test_published_form_round_trips() -> None:
    wait = cleanup_wait(DEFAULTS, {JITTER: "1m"}, ecs(f'{WAIT}=5s\nbroken\n'), rand=lambda low, high: 12.5)
    assert CleanupWait.from_json(wait.to_json()) == wait
    assert "\n" not in wait.to_json()  # one line of the lock file


HUGE = "1" + "0" * 400  # an integer no float holds


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"base": "x"}', '{"base": 1}',
                                  '{"base":%s,"source":"","jitter_max":0,"jitter_source":"","jitter":null,"notes":[]}' % HUGE,
                                  '{"base":NaN,"source":"","jitter_max":0,"jitter_source":"","jitter":null,"notes":[]}',
                                  '{"base":5,"source":"","jitter_max":Infinity,"jitter_source":"","jitter":1,"notes":[]}',
                                  '{"base":-5,"source":"","jitter_max":0,"jitter_source":"","jitter":null,"notes":[]}'])
def test_unusable_published_forms(text: str) -> None:
    assert CleanupWait.from_json(text) is None


@given(st.text(max_size=200))
def test_from_json_never_raises(text: str) -> None:
    result: Optional[CleanupWait] = CleanupWait.from_json(text)
    assert result is None or isinstance(result, CleanupWait)


ANY = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers(), max_size=2))


@given(st.fixed_dictionaries({k: ANY for k in ("base", "source", "jitter_max", "jitter_source", "jitter", "notes")}))
def test_from_json_never_raises_on_wrong_types(fields: Dict[str, object]) -> None:
    result: Optional[CleanupWait] = CleanupWait.from_json(json.dumps(fields))
    assert result is None or isinstance(result.describe(), str)
