"""The stunnel client configuration for one EFS mount (pure: no I/O).

Every value that reaches the rendered file comes from mount options a user (or a Docker
volume request) typed. stunnel's format is line based with `key = value` and `[section]`,
so a newline, `=` or `[` in a value could add directives (`exec = /bin/sh`). TunnelSpec
therefore validates every field against a strict whitelist; render() can then format
without escaping.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import List, Optional

SERVICE = "efs"
DEFAULT_NFS_PORT = 2049

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DOTTED_NUMERIC = re.compile(r"[0-9.]+")
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")  # no brackets, no %zone
# Backslash, ':' and '~' included: per-mount directories carry systemd-style escapes
# (/mnt/my-efs -> mnt-my\x2defs, ':' kept, see state.escape_path) and a long mount point's
# name ends in ~<hash>; stunnel gives none of them a meaning in a path value.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./@+:~\\-]*")
_MAX_PATH = 4096
# The first line of every config efsplug writes. The supervisor stops an orphan tunnel only
# if its config carries it: amazon-efs-utils keeps its own tunnels in the same directory.
MARKER = "# stunnel client configuration written by efsplug for one EFS mount."
# The same for a stunnel process shared by several mounts, and for one mount's section in it.
HOST_MARKER = "# stunnel process written by efsplug to serve the EFS mounts of one network namespace."
SERVICE_MARKER = "# stunnel section written by efsplug for one EFS mount, served by a shared process."


def _fail(field_name: str, value: object, why: str) -> ValueError:
    # repr() shows control characters such as \n visibly in the message.
    return ValueError(f"invalid tunnel {field_name} {value!r}: {why}")


def _check_int(field_name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field_name, value, "must be an integer")
    if not low <= value <= high:
        raise _fail(field_name, value, f"must be between {low} and {high}")


def _check_bool(field_name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(field_name, value, "must be true or false")


def _check_dns_name(field_name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise _fail(field_name, value, "must be a non-empty DNS name")
    if len(value) > 253:
        raise _fail(field_name, value, "is longer than 253 characters")
    labels = value.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise _fail(
                field_name,
                value,
                "must be a DNS name: labels of 1-63 letters, digits or '-', "
                "not starting or ending with '-'",
            )
    if labels[-1].isdigit():
        # A top-level label is never numeric: this is a malformed IPv4 address.
        raise _fail(field_name, value, "looks like an IP address but is not a valid one")


def _check_host(field_name: str, value: object) -> None:
    """A DNS name, an IPv4 address or an IPv6 address."""
    if isinstance(value, str) and ":" in value:
        try:
            if not _IPV6_TEXT.fullmatch(value):
                raise ValueError(value)
            ipaddress.IPv6Address(value)
        except ValueError:
            raise _fail(field_name, value, "is not a valid IPv6 address (no brackets, no %zone)") from None
        return
    if isinstance(value, str) and _DOTTED_NUMERIC.fullmatch(value):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise _fail(field_name, value, "is not a valid IPv4 address") from None
        return
    _check_dns_name(field_name, value)


def _check_path(field_name: str, value: object) -> None:
    if not isinstance(value, str):
        raise _fail(field_name, value, "must be a path")
    if not _SAFE_PATH.fullmatch(value):
        raise _fail(
            field_name,
            value,
            "must be an absolute path of letters, digits and _ . / @ + : ~ - \\ only",
        )
    if len(value) > _MAX_PATH:
        raise _fail(field_name, value, f"is longer than {_MAX_PATH} characters")
    if value.endswith("/"):
        raise _fail(field_name, value, "names a directory, not a file")


@dataclass(frozen=True)
class TunnelSpec:
    """What one tunnel needs; invalid values are refused at construction."""

    accept_port: int
    connect_host: str  # DNS name, IPv4 or IPv6 address of the mount target
    connect_port: int = DEFAULT_NFS_PORT
    check_host: Optional[str] = None  # name the server certificate must carry; None: no check
    sni: Optional[str] = None  # server name to send; efs-utils sends the DNS name to IPv6 targets
    verify_level: int = 2  # stunnel `verify`: 0 none, 1 if presented, 2 chain, 3 locally installed
    cafile: Optional[str] = None
    cert_file: Optional[str] = None  # IAM client certificate
    key_file: Optional[str] = None
    ocsp: bool = False
    debug_log: Optional[str] = None  # stunnel debug output goes here when set
    pid_file: Optional[str] = None
    fips: bool = False

    def __post_init__(self) -> None:
        _check_int("accept_port", self.accept_port, 1, 65535)
        _check_host("connect_host", self.connect_host)
        _check_int("connect_port", self.connect_port, 1, 65535)
        for name in ("check_host", "sni"):
            if getattr(self, name) is not None:
                _check_dns_name(name, getattr(self, name))
        _check_int("verify_level", self.verify_level, 0, 3)
        for name in ("cafile", "cert_file", "key_file", "debug_log", "pid_file"):
            value = getattr(self, name)
            if value is not None:
                _check_path(name, value)
        for name in ("ocsp", "fips"):
            _check_bool(name, getattr(self, name))
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("invalid tunnel: cert_file and key_file must be given together")
        # stunnel itself refuses any verify level above 0 without a CA.
        if self.verify_level >= 1 and self.cafile is None:
            raise ValueError(
                f"invalid tunnel: verify_level {self.verify_level} needs a cafile to verify against"
            )
        if self.check_host is not None and self.verify_level < 2:
            raise ValueError("invalid tunnel: check_host needs verify_level 2 or 3")


def render(spec: TunnelSpec) -> str:
    """The stunnel configuration file for spec: a process of its own serving one mount."""
    # Re-check: a frozen dataclass can still be altered with object.__setattr__.
    TunnelSpec.__post_init__(spec)
    lines: List[str] = [
        MARKER,
        # The process efsplug starts *is* stunnel: the pid it records stays valid.
        "foreground = yes",
        f"fips = {'yes' if spec.fips else 'no'}",
        *_SOCKET_OPTIONS,
    ]
    if spec.debug_log is not None:
        lines += ["debug = debug", f"output = {spec.debug_log}"]
    if spec.pid_file is not None:
        lines.append(f"pid = {spec.pid_file}")
    lines += ["", f"[{SERVICE}]", *_service_lines(spec)]
    return "\n".join(lines) + "\n"


def render_service(spec: TunnelSpec) -> str:
    """One mount's section for a shared stunnel process (render_host): no global options.

    The section is named after its port, which is unique on the host, so stunnel's log
    lines say which tunnel they are about.
    """
    TunnelSpec.__post_init__(spec)
    if spec.debug_log is not None or spec.pid_file is not None or spec.fips:
        # Global options: such a tunnel needs a process of its own (render).
        raise ValueError("invalid shared tunnel: debug_log, pid_file and fips are per process")
    lines = [SERVICE_MARKER, f"[{service_name(spec.accept_port)}]", *_SOCKET_OPTIONS, *_service_lines(spec)]
    return "\n".join(lines) + "\n"


def service_name(port: int) -> str:
    _check_int("accept_port", port, 1, 65535)
    return f"{SERVICE}-{port}"


def render_host(services_dir: str) -> str:
    """The configuration of a stunnel process that serves every section in services_dir.

    stunnel reads each file there at start and again on SIGHUP; a reload rebinds the
    listening ports but leaves established connections alone.
    """
    _check_path("services_dir", services_dir)
    return "\n".join([HOST_MARKER, "foreground = yes", "fips = no", f"include = {services_dir}"]) + "\n"


# Rebind at once after a restart; accept only from this host's loopback. NFS sends many
# small RPCs; Nagle on either leg adds ~40 ms per round trip.
_SOCKET_OPTIONS = (
    "socket = l:SO_REUSEADDR=yes",
    "socket = a:SO_BINDTODEVICE=lo",
    "socket = l:TCP_NODELAY=1",
    "socket = r:TCP_NODELAY=1",
)


def _service_lines(spec: TunnelSpec) -> List[str]:
    lines = [
        "client = yes",
        f"accept = 127.0.0.1:{spec.accept_port}",
        f"connect = {_connect_target(spec)}",
        # TLS 1.2 or newer: `sslVersion` would pin exactly 1.2 and rule out TLS 1.3.
        "sslVersionMin = TLSv1.2",
        "renegotiation = no",
        "TIMEOUTbusy = 20",
        "TIMEOUTclose = 0",
        "TIMEOUTidle = 70",
        # Resolve the mount target per connection so a changed DNS record is followed.
        "delay = yes",
        # /etc/hosts.deny must not be able to cut the local NFS client off its tunnel.
        "libwrap = no",
        f"verify = {spec.verify_level}",
    ]
    if spec.cafile is not None:
        lines.append(f"CAfile = {spec.cafile}")
    if spec.check_host is not None:
        lines.append(f"checkHost = {spec.check_host}")
    if spec.sni is not None:
        lines.append(f"sni = {spec.sni}")
    if spec.ocsp:
        lines.append("OCSPaia = yes")
    if spec.cert_file is not None and spec.key_file is not None:
        lines += [f"cert = {spec.cert_file}", f"key = {spec.key_file}"]
    return lines


def _connect_target(spec: TunnelSpec) -> str:
    host = spec.connect_host
    if ":" in host:
        # stunnel cuts the port off at the last colon and hands the rest to getaddrinfo,
        # which takes no brackets: "[2001:db8::1]:2049" does not resolve, "2001:db8::1:2049"
        # connects. The text comes from the parsed address, never from the input.
        host = ipaddress.IPv6Address(host).compressed
    return f"{host}:{spec.connect_port}"
