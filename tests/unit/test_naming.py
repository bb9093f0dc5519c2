"""DNS names of mount targets, per efs-utils' dns_name_format rules."""

from __future__ import annotations

from typing import Optional

import pytest

from efsplug.config import Config, parse_config
from efsplug.errors import ConfigError, UsageError
from efsplug.naming import crossaccount_dns_name, default_suffix, dns_name, is_dns_name, validate_region

FS = "fs-0123456789abcdef0"


@pytest.mark.parametrize(
    "region, az, expected",
    [
        ("us-east-1", None, f"{FS}.efs.us-east-1.amazonaws.com"),
        ("us-east-1", "us-east-1a", f"us-east-1a.{FS}.efs.us-east-1.amazonaws.com"),
        ("cn-north-1", None, f"{FS}.efs.cn-north-1.amazonaws.com.cn"),
        ("cn-northwest-1", "cn-northwest-1b", f"cn-northwest-1b.{FS}.efs.cn-northwest-1.amazonaws.com.cn"),
        ("us-gov-west-1", None, f"{FS}.efs.us-gov-west-1.amazonaws.com"),
        ("us-iso-east-1", None, f"{FS}.efs.us-iso-east-1.c2s.ic.gov"),
        ("us-isob-east-1", None, f"{FS}.efs.us-isob-east-1.sc2s.sgov.gov"),
    ],
)
def test_default_dns_names(region: str, az: Optional[str], expected: str) -> None:
    assert dns_name(FS, region, az=az, config=Config()) == expected


def test_configured_suffix_and_region_override_win() -> None:
    config = parse_config(
        "[mount]\ndns_name_suffix = example.internal\n[mount.cn-north-1]\ndns_name_suffix = cn.example\n"
    ).config
    assert dns_name(FS, "cn-northwest-1", config=config) == f"{FS}.efs.cn-northwest-1.example.internal"
    assert dns_name(FS, "cn-north-1", config=config) == f"{FS}.efs.cn-north-1.cn.example"
    assert dns_name(FS, "eu-west-1", config=config) == f"{FS}.efs.eu-west-1.example.internal"


def test_custom_format_and_az_dropping() -> None:
    config = parse_config("[mount]\ndns_name_format = {fs_id}.{az}.efs-{region}.{dns_name_suffix}\n").config
    assert dns_name(FS, "eu-west-1", az="eu-west-1c", config=config) == f"{FS}.eu-west-1c.efs-eu-west-1.amazonaws.com"
    assert dns_name(FS, "eu-west-1", config=config) == f"{FS}.efs-eu-west-1.amazonaws.com"
    dash = parse_config("[mount]\ndns_name_format = {az}-{fs_id}.efs.{region}.{dns_name_suffix}\n").config
    with pytest.raises(ConfigError, match="is not a valid host name; fix dns_name_format or dns_name_suffix in"):
        dns_name(FS, "eu-west-1", config=dash)  # "-fs-..." starts a label with a hyphen
    vpce = parse_config("[mount]\ndns_name_format = {fs_id}.efs.{region}.vpce.{dns_name_suffix}\n").config
    assert dns_name(FS, "us-east-2", az="us-east-2a", config=vpce) == f"{FS}.efs.us-east-2.vpce.amazonaws.com"


def test_result_too_long_is_rejected() -> None:
    config = parse_config("[mount]\ndns_name_format = {fs_id}." + "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60
                          + ".{region}.{dns_name_suffix}\n").config
    with pytest.raises(ConfigError, match="is not a valid host name"):
        dns_name(FS, "ap-southeast-2", config=config)


@pytest.mark.parametrize("bad", ["", "US-EAST-1", "us-east", "us-east-1\n", "us_east_1", "us-east-1.evil.com", "../1",
                                 "euro-de-east-1"])
def test_bad_regions_rejected(bad: str) -> None:
    with pytest.raises(UsageError, match="region"):
        validate_region(bad)
    with pytest.raises(UsageError):
        dns_name(FS, bad, config=Config())


@pytest.mark.parametrize("good", ["us-east-1", "ap-southeast-2", "us-gov-west-1", "cn-north-1", "eu-isoe-west-1", "il-central-1",
                                  "eusc-de-east-1"])
def test_good_regions(good: str) -> None:
    assert validate_region(good) == good


@pytest.mark.parametrize(
    "name, ok",
    [
        ("amazonaws.com", True), ("a", True), ("x-1.y2", True), ("A.B", True),
        ("", False), ("a..b", False), ("-a.com", False), ("a-.com", False), ("a_b.com", False),
        ("a" * 64 + ".com", False), ("é.com", False), (".".join(["a" * 62] * 4), True), (".".join(["a" * 63] * 4), False),
    ],
)
def test_is_dns_name(name: str, ok: bool) -> None:
    assert is_dns_name(name) is ok


def test_default_suffix_by_partition() -> None:
    assert default_suffix("eu-west-1") == "amazonaws.com"
    assert default_suffix("cn-north-1") == "amazonaws.com.cn"
    assert default_suffix("eu-isoe-west-1") == "cloud.adc-e.uk"
    assert default_suffix("us-isof-south-1") == "csp.hci.ic.gov"
    assert default_suffix("eusc-de-east-1") == "amazonaws.eu"  # European Sovereign Cloud


def test_crossaccount_name_is_az_id_based_whatever_dns_name_format_says() -> None:
    config = parse_config("[mount]\ndns_name_format = {fs_id}.custom.{region}.{dns_name_suffix}\n"
                          "[mount.cn-north-1]\ndns_name_suffix = amazonaws.com.cn\n").config
    assert crossaccount_dns_name(FS, "us-east-1", "use1-az4", config=config) == f"use1-az4.{FS}.efs.us-east-1.amazonaws.com"
    assert crossaccount_dns_name(FS, "cn-north-1", "cnn1-az1", config=config).endswith(".efs.cn-north-1.amazonaws.com.cn")
    with pytest.raises(ConfigError, match="crossaccount DNS name 'use1_az4.fs-"):
        crossaccount_dns_name(FS, "us-east-1", "use1_az4", config=config)
    with pytest.raises(UsageError, match="region"):
        crossaccount_dns_name(FS, "moon", "use1-az4", config=config)
