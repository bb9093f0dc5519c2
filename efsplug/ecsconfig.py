"""`/etc/ecs/ecs.config`, read as ecs-init reads it for the ECS agent.

The ECS agent gets this file's settings from ecs-init, which parses it itself and hands
them to the agent's container as its environment (ecs.service's `EnvironmentFile=` only
feeds ecs-init). ecs-init's rules, followed here so efsplug sees what the agent sees:
split on '\\n'; trim each line (Go's strings.TrimSpace); split at the first '='; skip lines
without one; later lines win. Nothing else: quotes, and spaces around '=', reach the agent
as written (`KEY="5s"` gives the agent `"5s"`, which it cannot parse as a duration).
Lines starting with '#' become a name no program asks for: comments in effect.

Parsing is pure (``parse_ecs_config``); ``load_ecs_config`` only reads the file. Only the
names asked for are kept: the file may hold secrets (ECS_ENGINE_AUTH_DATA). Warnings name
line numbers, never contents.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Dict, List, Mapping, Optional, Tuple

DEFAULT_ECS_CONFIG_PATH = Path("/etc/ecs/ecs.config")
ECS_CONFIG_ENV = "EFSPLUG_ECS_CONFIG"
MAX_BYTES = 1 << 20  # ecs.config is a few lines; anything this big is not one
# Go's unicode.IsSpace, which strings.TrimSpace uses (Python's str.strip also takes \x1c-\x1f).
GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u2028\u2029\u202f\u205f\u3000"


@dataclass(frozen=True)
class EcsSetting:
    value: str  # exactly what the ECS agent gets
    line: int


@dataclass(frozen=True)
class EcsConfig:
    source: str
    settings: Mapping[str, EcsSetting] = field(default_factory=dict)
    warnings: Tuple[str, ...] = ()

    def get(self, name: str) -> Optional[EcsSetting]:
        return self.settings.get(name)


def parse_ecs_config(data: bytes, source: str, names: Collection[str]) -> EcsConfig:
    """The settings called one of names (later lines win); never raises."""
    wanted = frozenset(names)
    settings: Dict[str, EcsSetting] = {}
    warnings: List[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip(GO_SPACE)
        except UnicodeDecodeError:
            warnings.append(f"{source}: line {number} is not UTF-8 text; ignored")
            continue
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            warnings.append(f"{source}: line {number} has no '='; ignored")
            continue
        if "\0" in line:
            warnings.append(f"{source}: line {number} holds a NUL byte; ignored")
            continue
        if name in wanted:
            settings[name] = EcsSetting(value, number)
        elif name.strip(GO_SPACE) in wanted:
            # ecs-init keeps the space in the name, so the agent never sees this setting.
            warnings.append(f"{source}: line {number} has a space around '='; "
                            f"the ECS agent ignores it, and so does efsplug")
    return EcsConfig(source, settings, tuple(warnings))


def ecs_config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ[ECS_CONFIG_ENV]) if environ.get(ECS_CONFIG_ENV) else DEFAULT_ECS_CONFIG_PATH


def load_ecs_config(path: Path, names: Collection[str]) -> EcsConfig:
    """Read path; a missing file is an empty config, any other trouble a warning."""
    source = str(path)
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the supervisor's start.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return EcsConfig(source)
    except OSError as err:
        return EcsConfig(source, warnings=(f"{source}: cannot read ({err.strerror}); ignored",))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return EcsConfig(source, warnings=(f"{source}: not a regular file; ignored",))
        chunks: List[bytes] = []
        size = 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        return EcsConfig(source, warnings=(f"{source}: cannot read ({err.strerror}); ignored",))
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        return EcsConfig(source, warnings=(f"{source}: larger than {MAX_BYTES // 1024} KiB; ignored",))
    return parse_ecs_config(b"".join(chunks), source, names)
