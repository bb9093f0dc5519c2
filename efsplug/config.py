"""`/etc/amazon/efs/efs-utils.conf`, typed, with efs-utils' defaults plus an [efsplug] section.

Parsing is pure (``parse_config``); ``load_config`` only reads the file.  Bad
values stop with a ConfigError that names file, section, key, value and fix;
unknown keys are reported as warnings so a config written for a newer
efs-utils still works. Every key of efs-utils 3.2 is known (a stock file loads
without a warning); docs/efs-utils-compat.md says which ones efsplug acts on.
"""

from __future__ import annotations

import configparser
import os
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from efsplug.errors import ConfigError, shown
from efsplug.optionvalues import REGION_RE, SAFE_PATH_RE

DEFAULT_CONFIG_PATH = Path("/etc/amazon/efs/efs-utils.conf")
CONFIG_ENV = "EFSPLUG_CONFIG"
DNS_FORMAT_FIELDS = frozenset({"az", "fs_id", "region", "dns_name_suffix"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# efs-proxy's own section (logging, S3 Files read bypass): efsplug runs no efs-proxy.
IGNORED_SECTIONS = frozenset({"proxy"})
FARGATE_SOURCE = "ecs.fargate"  # [client-info] source that makes efs-utils read [mount] az_id
AZ_ID_RE = re.compile(r"[a-z]{2,5}[0-9]{1,2}-az[0-9]{1,2}")
LOG_GROUP_RE = re.compile(r"[A-Za-z0-9._/#-]{1,512}")
# The values CloudWatch Logs takes for a retention policy.
RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                  3288, 3653)


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
    az_id: Optional[str] = None  # this host's AZ id; efs-utils reads it for ECS Fargate clients only
    # Known efs-utils keys that change nothing here (docs/efs-utils-compat.md says why).
    stunnel_logs_file: Optional[str] = None
    optimize_readahead: bool = False
    disable_fetch_ec2_metadata_token: bool = False
    prefer_ipv4: bool = False
    url_request_timeout_sec: Optional[float] = None
    efs_proxy_worker_threads: Optional[int] = None


@dataclass(frozen=True)
class WatchdogConfig:
    enabled: bool = True
    poll_interval_sec: int = 1
    unmount_grace_period_sec: int = 30
    tls_cert_renewal_interval_min: int = 60
    stunnel_health_check_enabled: bool = True
    stunnel_health_check_interval_min: int = 5
    # Read, not acted on: efsplug's checks run no command and need no repeated sightings.
    stunnel_health_check_command_timeout_sec: int = 30
    unmount_count_for_consistency: int = 5
    # efsplug additions: a finer renewal interval (overrides the _min key when set), and
    # the ECS cleanup wait in seconds (overrides ECS_ENGINE_TASK_CLEANUP_WAIT_DURATION).
    tls_cert_renewal_interval_sec: Optional[int] = None
    cleanup_wait_sec: Optional[int] = None


@dataclass(frozen=True)
class ClientInfoConfig:
    source: Optional[str] = None  # who mounts (ecs, k8s, ...): efs-utils and efsplug put it in the certificate


@dataclass(frozen=True)
class CloudWatchLogConfig:
    """Where mount.efs and the agent send their events when enabled (efsplug/logsink.py ships them)."""

    enabled: bool = False
    log_group_name: str = "/aws/efs/utils"
    retention_in_days: Optional[int] = None  # None: the group's policy is left as it is (a new group: never expire)
    # None: efs-utils' "<fs-id> - <instance-id> - mount.log"; the agent's "<instance-id> - efsplug-agent.log"
    log_stream_name: Optional[str] = None


TUNNEL_PROCESS_CHOICES = ("per-mount", "shared")


@dataclass(frozen=True)
class EfsplugConfig:
    state_dir: str = "/var/run/efs"
    stunnel: Optional[str] = None  # None: first of stunnel, stunnel5, stunnel4 on PATH
    cert_lifetime_min: int = 180
    # "per-mount": each tunnel is a stunnel process of its own (as efs-utils runs them).
    # "shared": stunnel processes of a network namespace serve up to tunnels_per_process
    # tunnels each, as sections (efsplug.tunnelhost); about 400 KiB per tunnel instead of 2 MiB.
    tunnel_process: str = "per-mount"
    tunnels_per_process: int = 8  # shared: each reload re-reads every section, ~2.5 ms each


@dataclass(frozen=True)
class Config:
    default: DefaultConfig = field(default_factory=DefaultConfig)
    mount: MountConfig = field(default_factory=MountConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    efsplug: EfsplugConfig = field(default_factory=EfsplugConfig)
    client_info: ClientInfoConfig = field(default_factory=ClientInfoConfig)
    cloudwatch_log: CloudWatchLogConfig = field(default_factory=CloudWatchLogConfig)
    region_mounts: Mapping[str, MountConfig] = field(default_factory=dict)
    source: str = "<defaults>"

    @property
    def fargate_az_id(self) -> Optional[str]:
        """[mount] az_id, which efs-utils uses instead of instance metadata on ECS Fargate only."""
        return self.mount.az_id if self.client_info.source == FARGATE_SOURCE else None

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


def _tunnel_process(text: str) -> str:
    if text not in TUNNEL_PROCESS_CHOICES:
        raise ValueError("use per-mount or shared")
    return text


def _logs_file(text: str) -> str:
    # efs-utils puts the file system id where {fs_id} stands.
    _path(text.replace("{fs_id}", "fs-0"))
    return text


def _seconds(text: str) -> float:
    if not re.fullmatch(r"[0-9]{1,4}(?:\.[0-9]{1,3})?", text) or not 0 < float(text) <= 3600:
        raise ValueError("use a number of seconds above 0 and up to 3600, like 1 or 0.5")
    return float(text)


def _az_id(text: str) -> str:
    if not AZ_ID_RE.fullmatch(text):
        raise ValueError("use an availability zone id like use1-az1")
    return text


def _client_source(text: str) -> str:
    if not 0 < len(text) <= 100:  # efs-utils' limit
        raise ValueError("use 1 to 100 characters, like ecs")
    return text


def _log_group(text: str) -> str:
    if not LOG_GROUP_RE.fullmatch(text.replace("{fs_id}", "fs-0")):
        raise ValueError("use a log group name of letters, digits and ._/#- ({fs_id} allowed)")
    return text


def _log_stream(text: str) -> str:
    if not 0 < len(text) <= 512 or ":" in text or "*" in text:
        raise ValueError("use 1 to 512 characters without ':' or '*'")
    return text


def _retention(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) not in RETENTION_DAYS:
        raise ValueError("use one of " + ", ".join(str(d) for d in RETENTION_DAYS))
    return int(text)


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
        "retry_nfs_mount_command_timeout_sec": _int(1, 3600), "az_id": _az_id,
        "stunnel_logs_file": _logs_file, "optimize_readahead": _bool, "disable_fetch_ec2_metadata_token": _bool,
        "prefer_ipv4": _bool, "url_request_timeout_sec": _seconds, "efs_proxy_worker_threads": _int(1, 1024),
    },
    WatchdogConfig: {
        "enabled": _bool, "poll_interval_sec": _int(1, 3600), "unmount_grace_period_sec": _int(0),
        "tls_cert_renewal_interval_min": _int(1, 1440), "stunnel_health_check_enabled": _bool,
        "stunnel_health_check_interval_min": _int(1, 1440),
        "tls_cert_renewal_interval_sec": _int(1, 86400), "cleanup_wait_sec": _int(1),
        "stunnel_health_check_command_timeout_sec": _int(1, 3600), "unmount_count_for_consistency": _int(1, 1000),
    },
    ClientInfoConfig: {"source": _client_source},
    CloudWatchLogConfig: {
        "enabled": _bool, "log_group_name": _log_group, "retention_in_days": _retention, "log_stream_name": _log_stream,
    },
    EfsplugConfig: {"state_dir": _path, "stunnel": _command, "cert_lifetime_min": _int(20, 1440),
                    "tunnel_process": _tunnel_process, "tunnels_per_process": _int(1, 1000)},
}
SECTIONS = {
    "DEFAULT": DefaultConfig, "mount": MountConfig, "mount-watchdog": WatchdogConfig, "efsplug": EfsplugConfig,
    "client-info": ClientInfoConfig, "cloudwatch-log": CloudWatchLogConfig,
}
ATTRS = {
    "DEFAULT": "default", "mount": "mount", "mount-watchdog": "watchdog", "efsplug": "efsplug",
    "client-info": "client_info", "cloudwatch-log": "cloudwatch_log",
}


def _section(base, name: str, items: Mapping[str, str], source: str, warnings: List[str]):
    kind = type(base)
    converters = CONVERTERS[kind]
    values = {}
    for key, raw in items.items():
        if key not in converters:
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
