"""ecs.config as ecs-init hands it to the ECS agent: line rules, bounds, warnings without contents."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List

from hypothesis import given, settings, strategies as st

from efsplug.ecsconfig import (
    DEFAULT_ECS_CONFIG_PATH,
    ECS_CONFIG_ENV,
    GO_SPACE,
    MAX_BYTES,
    EcsConfig,
    ecs_config_path,
    load_ecs_config,
    parse_ecs_config,
)

WAIT, JITTER = "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION", "ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION_JITTER"
NAMES = (WAIT, JITTER)
SRC = "/etc/ecs/ecs.config"
SECRET = "hunter2-c2VjcmV0LXRva2Vu"
# Every warning is one of these shapes: the file, a line number, a fixed reason.
WARNING = re.compile(re.escape(SRC) + r": line \d+ (is not UTF-8 text; ignored|has no '='; ignored|holds a NUL byte; "
                     r"ignored|has a space around '='; the ECS agent ignores it, and so does efsplug)")


def parse(text: str) -> EcsConfig:
    return parse_ecs_config(text.encode(), SRC, NAMES)


def values(cfg: EcsConfig) -> Dict[str, str]:
    return {name: s.value for name, s in cfg.settings.items()}


def test_an_ecs_optimized_ami_style_file() -> None:
    cfg = parse(
        "ECS_CLUSTER=prod\n"
        "# the cleanup wait, as the ECS docs show it\n"
        "\n"
        f"ECS_ENGINE_AUTH_DATA={{\"registry\":{{\"auth\":\"{SECRET}\"}}}}\n"
        f"{WAIT}=30m\n"
        f"  {JITTER}=5m  \r\n"  # indented, trailing spaces, CRLF
    )
    assert values(cfg) == {WAIT: "30m", JITTER: "5m"}
    assert (cfg.settings[WAIT].line, cfg.settings[JITTER].line) == (5, 6)
    assert cfg.warnings == ()


def test_later_lines_win() -> None:
    cfg = parse(f"{WAIT}=1h\n{WAIT}=2h\n{WAIT}=5s\n")
    assert cfg.get(WAIT) is not None and (cfg.get(WAIT).value, cfg.get(WAIT).line) == ("5s", 3)


def test_values_reach_the_agent_as_written() -> None:
    # ecs-init strips nothing inside the line: quotes, a space after '=', a trailing comment.
    assert values(parse(f'{WAIT}="5s"\n')) == {WAIT: '"5s"'}
    assert values(parse(f"{WAIT}='5s'\n")) == {WAIT: "'5s'"}
    assert values(parse(f"{WAIT}= 5s\n")) == {WAIT: " 5s"}
    assert values(parse(f"{WAIT}=5s # five\n")) == {WAIT: "5s # five"}
    assert values(parse(f"{WAIT}=a=b\n")) == {WAIT: "a=b"}  # split at the first '='
    assert values(parse(f"{WAIT}=\n")) == {WAIT: ""}


def test_comments_and_look_alikes_are_not_settings() -> None:
    assert values(parse(f"#{WAIT}=5s\n  # {WAIT}=5s\n")) == {}
    assert values(parse(f"export {WAIT}=5s\n{WAIT}X=5s\nX{WAIT}=5s\n")) == {}


def test_space_around_the_equals_sign_is_ignored_with_a_warning() -> None:
    cfg = parse(f"ECS_CLUSTER=x\n{WAIT} = 5s\n{JITTER}\t=1m\n")
    assert values(cfg) == {}
    assert cfg.warnings == (
        f"{SRC}: line 2 has a space around '='; the ECS agent ignores it, and so does efsplug",
        f"{SRC}: line 3 has a space around '='; the ECS agent ignores it, and so does efsplug",
    )


def test_malformed_lines_are_skipped_naming_the_line_never_the_content() -> None:
    data = f"{WAIT}=5s\n{SECRET}\n".encode() + b"ECS_X=\xff" + SECRET.encode() + b"\n" + f"{JITTER}=1m\0{SECRET}\n".encode()
    cfg = parse_ecs_config(data, SRC, NAMES)
    assert values(cfg) == {WAIT: "5s"}
    assert cfg.warnings == (f"{SRC}: line 2 has no '='; ignored", f"{SRC}: line 3 is not UTF-8 text; ignored",
                            f"{SRC}: line 4 holds a NUL byte; ignored")
    assert SECRET not in repr(cfg)


def test_only_the_names_asked_for_are_kept() -> None:
    cfg = parse(f"ECS_ENGINE_AUTH_DATA={SECRET}\nECS_ENGINE_AUTH_TYPE=dockercfg\n{WAIT}=5s\n")
    assert set(cfg.settings) == {WAIT}
    assert SECRET not in repr(cfg)


def reference(text: str) -> Dict[str, str]:
    """ecs-init's getEnvVars, transcribed: TrimSpace the file, split on \\n, TrimSpace, SplitN '=' 2."""
    found: Dict[str, str] = {}
    for line in text.strip(GO_SPACE).split("\n"):
        parts = line.strip(GO_SPACE).split("=", 1)
        if len(parts) == 2:
            found[parts[0]] = parts[1]
    return {k: v for k, v in found.items() if k in NAMES}


LINE = st.lists(st.sampled_from([WAIT, JITTER, "=", "#", " ", "\t", "\r", '"', "5s", "1m", "x", "\u00a0", "\x1c"]),
                max_size=6).map("".join)


@given(st.lists(LINE, max_size=8))
def test_agrees_with_ecs_init(lines: List[str]) -> None:
    text = "\n".join(lines)
    cfg = parse(text)
    assert values(cfg) == reference(text)
    for warning in cfg.warnings:
        assert WARNING.fullmatch(warning), warning


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise_and_warnings_carry_no_content(data: bytes) -> None:
    cfg = parse_ecs_config(data, SRC, NAMES)
    assert set(cfg.settings) <= set(NAMES)
    for warning in cfg.warnings:
        assert WARNING.fullmatch(warning), warning


def test_path_override() -> None:
    assert ecs_config_path({}) == DEFAULT_ECS_CONFIG_PATH == Path("/etc/ecs/ecs.config")
    assert ecs_config_path({ECS_CONFIG_ENV: ""}) == DEFAULT_ECS_CONFIG_PATH
    assert ecs_config_path({ECS_CONFIG_ENV: "/tmp/x/ecs.config"}) == Path("/tmp/x/ecs.config")


def test_a_missing_file_is_an_empty_config(tmp_path: Path) -> None:
    cfg = load_ecs_config(tmp_path / "ecs.config", NAMES)
    assert (cfg.settings, cfg.warnings) == ({}, ())


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ecs.config"
    path.write_text(f"ECS_CLUSTER=c\n{WAIT}=5s\n")
    cfg = load_ecs_config(path, NAMES)
    assert (values(cfg), cfg.source) == ({WAIT: "5s"}, str(path))


def test_a_file_over_the_bound_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ecs.config"
    path.write_bytes(f"{WAIT}=5s\n".encode() + b"#" * MAX_BYTES)
    cfg = load_ecs_config(path, NAMES)
    assert cfg.settings == {}
    assert cfg.warnings == (f"{path}: larger than 1024 KiB; ignored",)
    path.write_bytes(f"{WAIT}=5s\n".encode().ljust(MAX_BYTES, b"#"))  # exactly the bound: read
    assert values(load_ecs_config(path, NAMES)) == {WAIT: "5s"}


def test_not_a_regular_file(tmp_path: Path) -> None:
    assert load_ecs_config(tmp_path, NAMES).warnings == (f"{tmp_path}: not a regular file; ignored",)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes: reading it would block forever
    assert load_ecs_config(fifo, NAMES).warnings == (f"{fifo}: not a regular file; ignored",)
