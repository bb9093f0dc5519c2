"""The efs-utils option catalogue and the checks on each option's value.

Which names are efsplug's (typed), which are accepted and have no effect, and which
are refused, with the one line that says why; `options` combines them into a request.
docs/efs-utils-compat.md is the table users read.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Dict, Union

from efsplug.errors import UsageError, shown

FS_ID_RE = re.compile(r"fs-(?:[0-9a-f]{8}|[0-9a-f]{17})")
ACCESS_POINT_RE = re.compile(r"fsap-[0-9a-f]{17}")
# Two letters, or four for the European Sovereign Cloud (eusc-de-east-1).
REGION_RE = re.compile(r"(?:[a-z]{2}|eusc)(?:-[a-z]+)+-[0-9]{1,2}")
AZ_RE = re.compile(REGION_RE.pattern + "[a-z]")
PROFILE_RE = re.compile(r"[A-Za-z0-9_.+@-]+")
CREDS_URI_RE = re.compile(r"/[A-Za-z0-9._~/-]*")
SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9._+@/-]*")
# An IAM role ARN in any partition; IAM's character set for paths and names, less the
# comma, which ends a mount option before it could be part of one.
ROLE_ARN_RE = re.compile(r"arn:aws[a-z0-9-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=.@_/-]+")
OPTION_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
# No leading zeros: Python < 3.9.5 reads 010 as 10, mount.nfs (inet_aton) as 8.
IPV4_RE = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# Hex digits and colons (a dotted IPv4 tail allowed): no brackets, no %zone.
IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+")
PORT_RE = re.compile(r"[0-9]{1,5}")

FLAG_OPTIONS = ("tls", "iam", "ocsp", "noocsp", "crossaccount")
VALUE_OPTIONS = (
    "tlsport", "awsprofile", "awscredsuri", "accesspoint", "region", "az",
    "mounttargetip", "netns", "verify", "cafile", "rolearn", "jwtpath",
)
# efs-utils 3.x options that change nothing here: taken from the string, never sent to NFS.
NOOP_FLAGS = frozenset({
    "stunnel",  # selects efs-utils' stunnel mode instead of efs-proxy: efsplug only has that mode
    "notls",  # plain NFS, which is already what a mount without tls is (efs-utils: macOS only)
    "nodirects3read", "nos3readcache",  # S3 Files read bypass; efs-utils ignores them for EFS too
})
# efs-utils 3.x refuses these (capath, azid) or hands them to mount.nfs4, which refuses
# them (fsap): one line that says so beats the kernel's "incorrect mount option".
REFUSED: Dict[str, str] = {
    "capath": "option 'capath' is not supported (efs-utils refuses it too); give the CA bundle file with cafile=<file>",
    "azid": "option 'azid' is only for S3 Files mounts (efs-utils refuses it for EFS); "
            "use az=<zone name> or crossaccount",
    "fsap": "option 'fsap' is not an EFS option (efs-utils 3.x passes it to NFS, which refuses it); "
            "use accesspoint=fsap-<17 hex digits>",
}
IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def check_printable(what: str, text: str) -> None:
    if not text.isprintable():
        raise UsageError(f"{what} {shown(text)} contains a control or non-printable character; remove it")


def bad(name: str, value: str, fix: str) -> UsageError:
    return UsageError(f"option '{name}' value {shown(value)} is invalid; {fix}")


def has_dotdot(path: str) -> bool:
    return ".." in path.split("/")


def _safe_path(name: str, value: str) -> str:
    if not SAFE_PATH_RE.fullmatch(value) or has_dotdot(value):
        raise bad(name, value, "use an absolute path of letters, digits and ._+@/- without '..'")
    return value


def _int_in(name: str, value: str, low: int, high: int) -> int:
    if not PORT_RE.fullmatch(value) or not low <= int(value) <= high:
        raise bad(name, value, f"use a whole number from {low} to {high}")
    return int(value)


def parse_ip(text: str) -> IpAddress:
    """An IPv4 (strict dotted quad) or IPv6 address without zone; ValueError otherwise."""
    if IPV4_RE.fullmatch(text):
        return ipaddress.IPv4Address(text)
    if ":" in text and IPV6_RE.fullmatch(text):
        return ipaddress.IPv6Address(text)  # the pattern already ruled out a %zone
    raise ValueError(text)


def _mount_target_ip(name: str, value: str) -> str:
    try:
        return str(parse_ip(value))  # canonical text: what every later step parses again
    except ValueError:
        raise bad(name, value, "use an IPv4 address like 10.0.1.25 or an IPv6 address like 2001:db8::25 "
                               "(no brackets, no %zone)") from None


def _pattern(regex: "re.Pattern[str]", fix: str):
    def check(name: str, value: str) -> str:
        if not regex.fullmatch(value):
            raise bad(name, value, fix)
        return value
    return check


def _creds_uri(name: str, value: str) -> str:
    if not CREDS_URI_RE.fullmatch(value) or value.startswith("//") or has_dotdot(value):
        # Not echoed, even malformed: it is meant to be a credential (a typo of a real one).
        raise UsageError(f"option '{name}' value (not shown: it is a credential) is invalid; "
                         "use an absolute path like /v2/credentials/<id>")
    return value


_CHECKS = {
    "tlsport": lambda n, v: _int_in(n, v, 1, 65535),
    "verify": lambda n, v: _int_in(n, v, 0, 3),
    "accesspoint": _pattern(ACCESS_POINT_RE, "use fsap- followed by 17 lowercase hex digits"),
    "region": lambda n, v: validate_region(v),
    "az": _pattern(AZ_RE, "use an availability zone name like us-east-1a"),
    "awsprofile": _pattern(PROFILE_RE, "use a profile name of letters, digits and _.+@-"),
    "awscredsuri": _creds_uri,
    "mounttargetip": _mount_target_ip,
    "rolearn": _pattern(ROLE_ARN_RE, "use an IAM role ARN like arn:aws:iam::123456789012:role/efs-mounter"),
    "netns": _safe_path,
    "cafile": _safe_path,
    "jwtpath": _safe_path,
}


def typed_value(name: str, value: str):
    """The value of a VALUE_OPTIONS name, checked; UsageError naming the fix."""
    return _CHECKS[name](name, value)


def validate_region(region: str) -> str:
    check_printable("region", region)
    if not REGION_RE.fullmatch(region):
        raise bad("region", region, "use a region name like us-east-1")
    return region
