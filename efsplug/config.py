"""`/etc/amazon/efs/efs-utils.conf`, typed, with efs-utils' defaults plus an [efsplug] section.

Parsing is pure (``parse_config``); ``load_config`` only reads the file.  Bad
values stop with a ConfigError that names file, section, key, value and fix;
unknown keys are reported as warnings so a config written for a newer
efs-utils still works.
"""

from __future__ import annotations

import configparser
import os
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from efsplug.errors import ConfigError, shown
from efsplug.options import REGION_RE, SAFE_PATH_RE

DEFAULT_CONFIG_PATH = Path("/etc/amazon/efs/efs-utils.conf")
CONFIG_ENV = "EFSPLUG_CONFIG"
DNS_FORMAT_FIELDS = frozenset({"az", "fs_id", "region", "dns_name_suffix"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Sections and keys efs-utils ships that efsplug has no use for: accepted silently.
IGNORED_SECTIONS = frozenset({"client-info", "cloudwatch-log"})
IGNORED_MOUNT_KEYS = frozenset({"stunnel_logs_file", "optimize_readahead", "disable_fetch_ec2_metadata_token"})


@dataclass(frozen=True)
class DefaultConfig:
    logging_level: str = "INFO"
    logging_max_bytes: int = 1048576
    logging_file_count: int = 10
    state_file_dir_mode: int = 0o750


@dataclass(frozen=True)
class MountConfig:
    dns_name_format: str = "{az}.{fs_id}.efs.{region}.{dns_name_suffix}"
    dns_name_suffix: Optional[str] = None  # None: chosen by region (see naming.py)
    region: Optional[str] = None
    stunnel_debug_enabled: bool = False
    stunnel_cafile: str = "/etc/amazon/efs/efs-utils.crt"
    stunnel_check_cert_hostname: bool = True
    stunnel_check_cert_validity: bool = False
    port_range_lower_bound: int = 20049
    port_range_upper_bound: int = 21049  # exclusive
    fips_mode_enabled: bool = False
    fall_back_to_mount_target_ip_address_enabled: bool = True
    retry_nfs_mount_command: bool = True
    retry_nfs_mount_command_count: int = 3
    retry_nfs_mount_command_timeout_sec: int = 15


@dataclass(frozen=True)
class WatchdogConfig:
    enabled: bool = True
    poll_interval_sec: int = 1
    unmount_grace_period_sec: int = 30
    tls_cert_renewal_interval_min: int = 60
    stunnel_health_check_enabled: bool = True
    stunnel_health_check_interval_min: int = 5
    # efsplug additions: a finer renewal interval (overrides the _min key when set), and
    # the ECS cleanup wait in seconds (overrides ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION).
    tls_cert_renewal_interval_sec: Optional[int] = None
    cleanup_wait_sec: Optional[int] = None


@dataclass(frozen=True)
class EfsplugConfig:
    state_dir: str = "/var/run/efs"
    stunnel: Optional[str] = None  # None: first of stunnel, stunnel5, stunnel4 on PATH
    cert_lifetime_min: int = 180


@dataclass(frozen=True)
class Config:
    default: DefaultConfig = field(default_factory=DefaultConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    efsplug: EfsplugConfig = field(default_factory=EfsplugConfig)
    region_mounts: Mapping[str, MountConfig] = field(default_factory=dict)
    source: str = "<defaults>"

    def mount_for_region(self, region: Optional[str]) -> MountConfig:
        """[mount] with the [mount.<region>] overrides applied."""
        if region is None:
            return self.mount
        return self.region_mounts.get(region, self.mount)


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    warnings: List[str] = field(default_factory=list)


# --- value converters: each returns the value or raises ValueError(fix) ------------------

def _bool(text: str) -> bool:
    value = configparser.ConfigParser.BOOLEAN_STATES.get(text.lower())
    if value is None:
        raise ValueError("use true or false")
    return value


def _int(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        fix = f"use a whole number from {low}" + (f" to {high}" if high is not None else " up")
        if not text.isdigit() or not text.isascii():
            raise ValueError(fix)
        number = int(text)
        if number < low or (high is not None and number > high):
            raise ValueError(fix)
        return number
    return convert


def _octal_mode(text: str) -> int:
    if not text.isascii() or not text.isdigit() or any(ch in "89" for ch in text) or int(text, 8) > 0o777:
        raise ValueError("use an octal mode like 750")
    return int(text, 8)


def _level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError("use one of " + ", ".join(LOG_LEVELS))
    return text.upper()


def _path(text: str) -> str:
    # These paths are written into the tunnel configuration: no room for '=', '[' or spaces.
    if not SAFE_PATH_RE.fullmatch(text) or ".." in text.split("/"):
        raise ValueError("use an absolute path of letters, digits and ._+@/- without '..'")
    return text


def _command(text: str) -> str:
    if not (SAFE_PATH_RE.fullmatch(text) or SAFE_PATH_RE.fullmatch("/" + text)) or ".." in text.split("/"):
        raise ValueError("use a program name or absolute path of letters, digits and ._+@/-")
    return text


def _region(text: str) -> str:
    if not REGION_RE.fullmatch(text):
        raise ValueError("use a region name like us-east-1")
    return text


def _suffix(text: str) -> str:
    from efsplug.naming import is_dns_name  # late: naming imports this module

    if not is_dns_name(text):
        raise ValueError("use a DNS domain like amazonaws.com")
    return text


def _dns_format(text: str) -> str:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        raise ValueError("fix the unbalanced { or }") from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in DNS_FORMAT_FIELDS or spec or conversion:
            raise ValueError("use only {az}, {fs_id}, {region} and {dns_name_suffix} placeholders")
        names.add(name)
    if "fs_id" not in names:
        raise ValueError("include the {fs_id} placeholder")
    return text


CONVERTERS: Dict[type, Dict[str, Callable[[str], object]]] = {
    DefaultConfig: {
        "logging_level": _level, "logging_max_bytes": _int(0), "logging_file_count": _int(0),
        "state_file_dir_mode": _octal_mode,
    },
    MountConfig: {
        "dns_name_format": _dns_format, "dns_name_suffix": _suffix, "region": _region,
        "stunnel_debug_enabled": _bool, "stunnel_cafile": _path,
        "stunnel_check_cert_hostname": _bool, "stunnel_check_cert_validity": _bool,
        "port_range_lower_bound": _int(1, 65535), "port_range_upper_bound": _int(1, 65536),
        "fips_mode_enabled": _bool, "fall_back_to_mount_target_ip_address_enabled": _bool,
        "retry_nfs_mount_command": _bool, "retry_nfs_mount_command_count": _int(1, 100),
        "retry_nfs_mount_command_timeout_sec": _int(1, 3600),
    },
    WatchdogConfig: {
        "enabled": _bool, "poll_interval_sec": _int(1, 3600), "unmount_grace_period_sec": _int(0),
        "tls_cert_renewal_interval_min": _int(1, 1440), "stunnel_health_check_enabled": _bool,
        "stunnel_health_check_interval_min": _int(1, 1440),
        "tls_cert_renewal_interval_sec": _int(1, 86400), "cleanup_wait_sec": _int(1),
    },
    EfsplugConfig: {"state_dir": _path, "stunnel": _command, "cert_lifetime_min": _int(20, 1440)},
}
SECTIONS = {"DEFAULT": DefaultConfig, "mount": MountConfig, "mount-watchdog": WatchdogConfig, "efsplug": EfsplugConfig}
ATTRS = {"DEFAULT": "default", "mount": "mount", "mount-watchdog": "watchdog", "efsplug": "efsplug"}


def _section(base, name: str, items: Mapping[str, str], source: str, warnings: List[str]):
    kind = type(base)
    converters = CONVERTERS[kind]
    values = {}
    for key, raw in items.items():
        if key not in converters:
            if not (kind is MountConfig and key in IGNORED_MOUNT_KEYS):
                warnings.append(f"{source}: [{name}] unknown key '{key}' ignored; check its spelling")
            continue
        try:
            if not raw.isprintable():
                raise ValueError("remove the control characters")
            values[key] = converters[key](raw)
        except ValueError as err:
            raise ConfigError(f"{source}: [{name}] {key} = {shown(raw)} is invalid; {err}") from None
    result = replace(base, **values)
    if kind is MountConfig and result.port_range_lower_bound >= result.port_range_upper_bound:
        raise ConfigError(
            f"{source}: [{name}] port_range_lower_bound {result.port_range_lower_bound} is not below "
            f"port_range_upper_bound {result.port_range_upper_bound}; make the lower bound smaller"
        )
    return result


def parse_config(text: str, source: str = str(DEFAULT_CONFIG_PATH)) -> LoadedConfig:
    # A default section name that cannot occur, so [DEFAULT] does not leak into others.
    parser = configparser.ConfigParser(interpolation=None, default_section="\0efsplug-none")
    try:
        parser.read_string(text, source=source)
    except configparser.Error as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{source}: cannot parse ({first_line}); fix the file's INI syntax") from None
    warnings: List[str] = []
    parts: Dict[str, object] = {}
    for name, kind in SECTIONS.items():
        items = dict(parser.items(name)) if parser.has_section(name) else {}
        parts[ATTRS[name]] = _section(kind(), name, items, source, warnings)
    region_mounts: Dict[str, MountConfig] = {}
    for name in parser.sections():
        if name.startswith("mount.") and name != "mount.":
            region = name[len("mount."):]
            if not REGION_RE.fullmatch(region):
                raise ConfigError(f"{source}: section [{name}] does not name a region; use [mount.us-east-1] style")
            region_mounts[region] = _section(parts["mount"], name, dict(parser.items(name)), source, warnings)
        elif name not in SECTIONS and name not in IGNORED_SECTIONS:
            warnings.append(f"{source}: unknown section [{name}] ignored; check its spelling")
    config = Config(region_mounts=region_mounts, source=source, **parts)  # type: ignore[arg-type]
    return LoadedConfig(config, warnings)


def config_path(environ: Mapping[str, str]) -> Path:
    return Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else DEFAULT_CONFIG_PATH


def load_config(path: Optional[Path] = None, environ: Optional[Mapping[str, str]] = None) -> LoadedConfig:
    """Read the config file; a missing file means efs-utils' defaults."""
    env = os.environ if environ is None else environ
    explicit = path is not None or bool(env.get(CONFIG_ENV))
    target = Path(path) if path is not None else config_path(env)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        warnings = [f"{target}: not found; using built-in defaults"] if explicit else []
        return LoadedConfig(Config(source=str(target)), warnings)
    except OSError as err:
        raise ConfigError(f"{target}: cannot read ({err.strerror}); fix its permissions or set {CONFIG_ENV}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: is not UTF-8 text; rewrite it as plain text") from None
    return parse_config(text, source=str(target))
