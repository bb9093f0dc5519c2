"""The mount target's DNS name, built the way efs-utils builds it."""

from __future__ import annotations

import re
from typing import Optional

from efsplug import options
from efsplug.config import Config
from efsplug.errors import ConfigError, shown

_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)

# Partitions whose endpoints do not live under amazonaws.com (longest prefix first).
_PARTITION_SUFFIXES = (
    ("us-isob-", "sc2s.sgov.gov"),
    ("us-isof-", "csp.hci.ic.gov"),
    ("eu-isoe-", "cloud.adc-e.uk"),
    ("eusc-", "amazonaws.eu"),
    ("us-iso-", "c2s.ic.gov"),
    ("cn-", "amazonaws.com.cn"),
)
DEFAULT_SUFFIX = "amazonaws.com"


def is_dns_name(text: str) -> bool:
    """A host name of letter-digit-hyphen labels, at most 253 characters."""
    if not text or len(text) > 253 or not text.isascii():
        return False
    return all(_LABEL_RE.fullmatch(label) for label in text.split("."))


def validate_region(region: str) -> str:
    """Return ``region`` if it looks like an AWS region, else raise UsageError naming the fix."""
    return options.validate_region(region)


def default_suffix(region: str) -> str:
    for prefix, suffix in _PARTITION_SUFFIXES:
        if region.startswith(prefix):
            return suffix
    return DEFAULT_SUFFIX


def dns_name(fs_id: str, region: str, *, az: Optional[str] = None, config: Config) -> str:
    """``{az}.{fs_id}.efs.{region}.{dns_name_suffix}``; the ``{az}.`` part goes when az is unknown."""
    validate_region(region)
    mount = config.mount_for_region(region)
    fmt = mount.dns_name_format
    if not az:
        fmt = fmt.replace("{az}.", "").replace("{az}", "")
    suffix = mount.dns_name_suffix or default_suffix(region)
    name = fmt.format(az=az or "", fs_id=fs_id, region=region, dns_name_suffix=suffix)
    if not is_dns_name(name):
        raise ConfigError(
            f"DNS name {shown(name)} made from dns_name_format {shown(mount.dns_name_format)} is not a "
            f"valid host name; fix dns_name_format or dns_name_suffix in {config.source}"
        )
    return name


def crossaccount_dns_name(fs_id: str, region: str, az_id: str, *, config: Config) -> str:
    """``{az_id}.{fs_id}.efs.{region}.{suffix}``: how efs-utils reaches a file system of another account."""
    validate_region(region)
    mount = config.mount_for_region(region)
    name = f"{az_id}.{fs_id}.efs.{region}.{mount.dns_name_suffix or default_suffix(region)}"
    if not is_dns_name(name):
        raise ConfigError(f"crossaccount DNS name {shown(name)} is not a valid host name; check the AZ id and "
                          f"dns_name_suffix in {config.source}")
    return name
