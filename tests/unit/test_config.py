"""efs-utils.conf parsing: defaults, overrides, warnings and every rejected value."""

from __future__ import annotations

from pathlib import Path

import pytest

from efsplug.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ClientInfoConfig,
    CloudWatchLogConfig,
    Config,
    DefaultConfig,
    MountConfig,
    load_config,
    parse_config,
)
from efsplug.errors import ConfigError

# The shape of the file efs-utils installs (abridged), plus an [efsplug] section.
EFS_UTILS_CONF = """\
#
# Copyright header
#
[DEFAULT]
logging_level = debug
logging_max_bytes = 2097152
logging_file_count = 5
state_file_dir_mode = 700

[mount]
dns_name_format = {az}.{fs_id}.efs.{region}.{dns_name_suffix}
dns_name_suffix = amazonaws.com
stunnel_debug_enabled = false
stunnel_cafile = /etc/amazon/efs/efs-utils.crt
stunnel_check_cert_hostname = true
stunnel_check_cert_validity = yes
port_range_lower_bound = 20100
port_range_upper_bound = 20200
optimize_readahead = false
fall_back_to_mount_target_ip_address_enabled = off
retry_nfs_mount_command = true
retry_nfs_mount_command_count = 5
retry_nfs_mount_command_timeout_sec = 20

[mount.cn-north-1]
dns_name_suffix = amazonaws.com.cn

[mount.us-iso-east-1]
dns_name_suffix = c2s.ic.gov
stunnel_cafile = /etc/amazon/efs/iso.crt
port_range_lower_bound = 30000
port_range_upper_bound = 30010

[mount-watchdog]
enabled = true
poll_interval_sec = 2
unmount_grace_period_sec = 45
tls_cert_renewal_interval_min = 30

[client-info]
source = ecs

[efsplug]
state_dir = /run/efsplug
stunnel = /usr/bin/stunnel4
cert_lifetime_min = 120
"""


# Every key of efs-utils 3.2's stock efs-utils.conf with its shipped value (commented-out
# keys written in, as operators uncomment them), and the 3.x keys its code reads beyond that.
STOCK_EFS_UTILS_3_2 = """\
[DEFAULT]
logging_level = INFO
logging_max_bytes = 1048576
logging_file_count = 10
state_file_dir_mode = 750

[mount]
dns_name_format = {az}.{fs_id}.efs.{region}.{dns_name_suffix}
dns_name_suffix = amazonaws.com
region = us-east-1
stunnel_debug_enabled = false
stunnel_logs_file = /var/log/amazon/efs/{fs_id}.stunnel.log
stunnel_cafile = /etc/amazon/efs/efs-utils.crt
stunnel_check_cert_hostname = true
stunnel_check_cert_validity = false
fips_mode_enabled = false
port_range_lower_bound = 20049
port_range_upper_bound = 21049
optimize_readahead = true
fall_back_to_mount_target_ip_address_enabled = true
disable_fetch_ec2_metadata_token = false
retry_nfs_mount_command = true
retry_nfs_mount_command_count = 3
retry_nfs_mount_command_timeout_sec = 15
az_id = use1-az4
prefer_ipv4 = false
url_request_timeout_sec = 1
efs_proxy_worker_threads = 4

[mount.cn-north-1]
dns_name_suffix = amazonaws.com.cn

[mount.cn-northwest-1]
dns_name_suffix = amazonaws.com.cn

[mount.eu-isoe-west-1]
dns_name_suffix = cloud.adc-e.uk
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount.eusc-de-east-1]
dns_name_suffix = amazonaws.eu
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount.us-iso-east-1]
dns_name_suffix = c2s.ic.gov
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount.us-iso-west-1]
dns_name_suffix = c2s.ic.gov
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount.us-isob-east-1]
dns_name_suffix = sc2s.sgov.gov
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount.us-isob-west-1]
dns_name_suffix = sc2s.sgov.gov
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount.us-isof-east-1]
dns_name_suffix = csp.hci.ic.gov
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount.us-isof-south-1]
dns_name_suffix = csp.hci.ic.gov
stunnel_cafile = /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem

[mount-watchdog]
enabled = true
poll_interval_sec = 1
unmount_count_for_consistency = 5
unmount_grace_period_sec = 30
tls_cert_renewal_interval_min = 60
stunnel_health_check_enabled = true
stunnel_health_check_interval_min = 5
stunnel_health_check_command_timeout_sec = 30

[client-info]
source = ecs.fargate

[cloudwatch-log]
enabled = false
log_group_name = /aws/efs/utils
retention_in_days = 14
log_stream_name = fs-12345678 - i-0123456789abcdef0 - mount.log

[proxy]
proxy_logging_level = INFO
proxy_logging_max_bytes = 1048576
proxy_logging_file_count = 10
"""


def test_stock_efs_utils_3_2_file_loads_without_a_warning(tmp_path: Path) -> None:
    conf = tmp_path / "efs-utils.conf"
    conf.write_text(STOCK_EFS_UTILS_3_2)
    loaded = load_config(conf, environ={})
    assert loaded.warnings == []
    c = loaded.config
    assert c.default == DefaultConfig()
    m = c.mount
    assert (m.region, m.dns_name_suffix, m.port_range_upper_bound, m.fips_mode_enabled) == (
        "us-east-1", "amazonaws.com", 21049, False)
    assert m.stunnel_logs_file == "/var/log/amazon/efs/{fs_id}.stunnel.log"
    assert (m.optimize_readahead, m.disable_fetch_ec2_metadata_token, m.prefer_ipv4) == (True, False, False)
    assert (m.az_id, m.url_request_timeout_sec, m.efs_proxy_worker_threads) == ("use1-az4", 1.0, 4)
    assert (m.retry_nfs_mount_command, m.retry_nfs_mount_command_count, m.retry_nfs_mount_command_timeout_sec) == (
        True, 3, 15)
    w = c.watchdog
    assert (w.unmount_count_for_consistency, w.stunnel_health_check_command_timeout_sec) == (5, 30)
    assert (w.enabled, w.poll_interval_sec, w.unmount_grace_period_sec, w.tls_cert_renewal_interval_min) == (
        True, 1, 30, 60)
    assert c.client_info == ClientInfoConfig(source="ecs.fargate")
    assert c.fargate_az_id == "use1-az4"
    assert c.cloudwatch_log == CloudWatchLogConfig(
        enabled=False, log_group_name="/aws/efs/utils", retention_in_days=14,
        log_stream_name="fs-12345678 - i-0123456789abcdef0 - mount.log")
    assert sorted(c.region_mounts) == [
        "cn-north-1", "cn-northwest-1", "eu-isoe-west-1", "eusc-de-east-1", "us-iso-east-1", "us-iso-west-1",
        "us-isob-east-1", "us-isob-west-1", "us-isof-east-1", "us-isof-south-1"]
    iso = c.mount_for_region("us-isof-south-1")
    assert (iso.dns_name_suffix, iso.stunnel_cafile) == (
        "csp.hci.ic.gov", "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem")
    assert iso.az_id == "use1-az4"  # the rest inherited from [mount]


def test_az_id_counts_only_for_fargate_clients() -> None:
    assert parse_config("[mount]\naz_id = use1-az1\n").config.fargate_az_id is None
    ecs = parse_config("[mount]\naz_id = use1-az1\n[client-info]\nsource = ecs\n").config
    assert (ecs.fargate_az_id, ecs.client_info.source) == (None, "ecs")
    assert parse_config("[client-info]\nsource = ecs.fargate\n").config.fargate_az_id is None


def test_defaults_match_efs_utils() -> None:
    c = Config()
    m = c.mount
    assert m.dns_name_format == "{az}.{fs_id}.efs.{region}.{dns_name_suffix}"
    assert m.dns_name_suffix is None and m.region is None
    assert (m.stunnel_check_cert_hostname, m.stunnel_check_cert_validity) == (True, False)
    assert (m.port_range_lower_bound, m.port_range_upper_bound) == (20049, 21049)
    assert (m.retry_nfs_mount_command, m.retry_nfs_mount_command_count, m.retry_nfs_mount_command_timeout_sec) == (True, 3, 15)
    assert m.fall_back_to_mount_target_ip_address_enabled is True
    assert m.stunnel_cafile == "/etc/amazon/efs/efs-utils.crt"
    assert (m.fips_mode_enabled, m.stunnel_debug_enabled) == (False, False)
    w = c.watchdog
    assert (w.enabled, w.poll_interval_sec, w.unmount_grace_period_sec, w.tls_cert_renewal_interval_min) == (True, 1, 30, 60)
    assert (w.stunnel_health_check_enabled, w.stunnel_health_check_interval_min) == (True, 5)
    assert (c.default.logging_level, c.default.state_file_dir_mode) == ("INFO", 0o750)
    assert (c.efsplug.state_dir, c.efsplug.stunnel, c.efsplug.cert_lifetime_min) == ("/var/run/efs", None, 180)
    assert parse_config("").config == Config(source=str(DEFAULT_CONFIG_PATH))


def test_full_file_parses_with_region_overrides() -> None:
    loaded = parse_config(EFS_UTILS_CONF, source="/etc/x.conf")
    c = loaded.config
    assert loaded.warnings == []  # optimize_readahead and [client-info] are known efs-utils items
    assert (c.default.logging_level, c.default.logging_max_bytes, c.default.logging_file_count) == ("DEBUG", 2097152, 5)
    assert c.default.state_file_dir_mode == 0o700
    assert c.mount.stunnel_check_cert_validity is True
    assert c.mount.fall_back_to_mount_target_ip_address_enabled is False
    assert (c.mount.port_range_lower_bound, c.mount.port_range_upper_bound) == (20100, 20200)
    assert (c.mount.retry_nfs_mount_command_count, c.mount.retry_nfs_mount_command_timeout_sec) == (5, 20)
    assert (c.watchdog.poll_interval_sec, c.watchdog.unmount_grace_period_sec, c.watchdog.tls_cert_renewal_interval_min) == (2, 45, 30)
    assert (c.efsplug.state_dir, c.efsplug.stunnel, c.efsplug.cert_lifetime_min) == ("/run/efsplug", "/usr/bin/stunnel4", 120)

    assert c.mount_for_region("us-east-1") == c.mount
    assert c.mount_for_region(None) == c.mount
    cn = c.mount_for_region("cn-north-1")
    assert cn.dns_name_suffix == "amazonaws.com.cn"
    assert cn.port_range_lower_bound == 20100  # inherited from [mount]
    iso = c.mount_for_region("us-iso-east-1")
    assert (iso.stunnel_cafile, iso.port_range_lower_bound, iso.port_range_upper_bound) == ("/etc/amazon/efs/iso.crt", 30000, 30010)
    assert iso.retry_nfs_mount_command_count == 5


def test_default_section_does_not_leak_into_other_sections() -> None:
    loaded = parse_config("[DEFAULT]\nlogging_level = ERROR\n[mount]\nregion = eu-west-1\n")
    assert loaded.warnings == []
    assert loaded.config.default.logging_level == "ERROR"
    assert loaded.config.mount.region == "eu-west-1"


def test_unknown_keys_and_sections_warn() -> None:
    loaded = parse_config("[mount]\nregoin = us-east-1\n[mount-watchdog]\nfoo = 1\n[mystery]\na = b\n[mount.]\n", source="/c")
    assert loaded.warnings == [
        "/c: [mount] unknown key 'regoin' ignored; check its spelling",
        "/c: [mount-watchdog] unknown key 'foo' ignored; check its spelling",
        "/c: unknown section [mystery] ignored; check its spelling",
        "/c: unknown section [mount.] ignored; check its spelling",
    ]
    assert loaded.config.mount.region is None


BAD_CASES = [
    ("[mount]\nport_range_lower_bound = abc\n", "[mount] port_range_lower_bound = 'abc' is invalid; use a whole number from 1 to 65535"),
    ("[mount]\nport_range_lower_bound = -1\n", "port_range_lower_bound = '-1' is invalid"),
    ("[mount]\nport_range_lower_bound = 0\n", "from 1 to 65535"),
    ("[mount]\nport_range_upper_bound = 70000\n", "from 1 to 65536"),
    ("[mount]\nport_range_lower_bound = 21049\n", "[mount] port_range_lower_bound 21049 is not below port_range_upper_bound 21049; make the lower bound smaller"),
    ("[mount]\nport_range_lower_bound = 100\nport_range_upper_bound = 50\n", "is not below port_range_upper_bound 50"),
    ("[mount.us-east-2]\nport_range_upper_bound = 20000\n", "[mount.us-east-2] port_range_lower_bound 20049 is not below"),
    ("[mount]\nport_range_lower_bound = ２００４９\n", "use a whole number"),
    ("[mount]\nstunnel_check_cert_hostname = maybe\n", "[mount] stunnel_check_cert_hostname = 'maybe' is invalid; use true or false"),
    ("[mount-watchdog]\nenabled = 2\n", "[mount-watchdog] enabled = '2' is invalid; use true or false"),
    ("[mount]\ndns_name_format = {fs_id}.{vpc}.example.com\n", "use only {az}, {fs_id}, {region} and {dns_name_suffix} placeholders"),
    ("[mount]\ndns_name_format = {fs_id!r}.efs\n", "use only {az}"),
    ("[mount]\ndns_name_format = {fs_id:>30}.efs\n", "use only {az}"),
    ("[mount]\ndns_name_format = {fs_id.__class__}\n", "use only {az}"),
    ("[mount]\ndns_name_format = {0}.efs\n", "use only {az}"),
    ("[mount]\ndns_name_format = efs.{region}.amazonaws.com\n", "include the {fs_id} placeholder"),
    ("[mount]\ndns_name_format = {fs_id.efs\n", "fix the unbalanced { or }"),
    ("[mount]\ndns_name_suffix = amazon_aws.com\n", "[mount] dns_name_suffix = 'amazon_aws.com' is invalid; use a DNS domain"),
    ("[mount]\ndns_name_suffix = -bad.com\n", "use a DNS domain"),
    ("[mount]\nregion = moon-base-1a\n", "[mount] region = 'moon-base-1a' is invalid; use a region name like us-east-1"),
    ("[mount]\nstunnel_cafile = relative.crt\n", "stunnel_cafile = 'relative.crt' is invalid; use an absolute path"),
    ("[mount]\nstunnel_cafile = /etc/x.crt\n  verify = 0\n", "stunnel_cafile = '/etc/x.crt\\nverify = 0' is invalid"),
    ("[mount]\nstunnel_cafile = /etc/[x].crt\n", "use an absolute path"),
    ("[mount]\nstunnel_cafile = /etc/../x.crt\n", "without '..'"),
    ("[mount]\nretry_nfs_mount_command_count = 0\n", "retry_nfs_mount_command_count = '0' is invalid; use a whole number from 1 to 100"),
    ("[mount]\nretry_nfs_mount_command_timeout_sec = 1.5\n", "from 1 to 3600"),
    ("[mount-watchdog]\npoll_interval_sec = 0\n", "[mount-watchdog] poll_interval_sec = '0' is invalid"),
    ("[DEFAULT]\nlogging_level = loud\n", "[DEFAULT] logging_level = 'loud' is invalid; use one of DEBUG, INFO"),
    ("[DEFAULT]\nstate_file_dir_mode = 789\n", "use an octal mode like 750"),
    ("[DEFAULT]\nstate_file_dir_mode = 1777\n", "use an octal mode like 750"),
    ("[efsplug]\nstate_dir = run/efs\n", "[efsplug] state_dir = 'run/efs' is invalid"),
    ("[efsplug]\nstunnel = stunnel;rm\n", "[efsplug] stunnel = 'stunnel;rm' is invalid; use a program name or absolute path"),
    ("[efsplug]\ncert_lifetime_min = 5\n", "cert_lifetime_min = '5' is invalid; use a whole number from 20 to 1440"),
    ("[mount.moon]\nregion = us-east-1\n", "section [mount.moon] does not name a region"),
    # efs-utils 3.x keys efsplug reads
    ("[mount]\naz_id = us-east-1a\n", "[mount] az_id = 'us-east-1a' is invalid; use an availability zone id like use1-az1"),
    ("[mount]\ndisable_fetch_ec2_metadata_token = sometimes\n", "disable_fetch_ec2_metadata_token = 'sometimes' is "
                                                                "invalid; use true or false"),
    ("[mount]\noptimize_readahead = 2\n", "optimize_readahead = '2' is invalid; use true or false"),
    ("[mount]\nprefer_ipv4 = v4\n", "prefer_ipv4 = 'v4' is invalid"),
    ("[mount]\nstunnel_logs_file = logs/{fs_id}.log\n", "stunnel_logs_file = 'logs/{fs_id}.log' is invalid; use an "
                                                         "absolute path"),
    ("[mount]\nstunnel_logs_file = /var/log/{fs_id}=x\n", "stunnel_logs_file"),
    ("[mount]\nurl_request_timeout_sec = 0\n", "url_request_timeout_sec = '0' is invalid; use a number of seconds "
                                                "above 0 and up to 3600, like 1 or 0.5"),
    ("[mount]\nurl_request_timeout_sec = 1e3\n", "url_request_timeout_sec = '1e3' is invalid"),
    ("[mount]\nefs_proxy_worker_threads = 0\n", "efs_proxy_worker_threads = '0' is invalid; use a whole number from 1"),
    ("[mount-watchdog]\nunmount_count_for_consistency = 0\n", "[mount-watchdog] unmount_count_for_consistency = '0' is "
                                                              "invalid; use a whole number from 1 to 1000"),
    ("[mount-watchdog]\nstunnel_health_check_command_timeout_sec = -5\n", "stunnel_health_check_command_timeout_sec = "
                                                                          "'-5' is invalid"),
    ("[client-info]\nsource = " + "x" * 101 + "\n", "[client-info] source = 'xxx"),
    ("[client-info]\nsource =\n", "[client-info] source = '' is invalid; use 1 to 100 characters, like ecs"),
    ("[cloudwatch-log]\nenabled = yes please\n", "[cloudwatch-log] enabled = 'yes please' is invalid; use true or false"),
    ("[cloudwatch-log]\nretention_in_days = 10\n", "[cloudwatch-log] retention_in_days = '10' is invalid; use one of "
                                                    "1, 3, 5, 7, 14, 30"),
    ("[cloudwatch-log]\nlog_group_name = efs utils\n", "log_group_name = 'efs utils' is invalid; use a log group name"),
    ("[cloudwatch-log]\nlog_stream_name = a:b\n", "log_stream_name = 'a:b' is invalid; use 1 to 512 characters "
                                                   "without ':' or '*'"),
    ("region = us-east-1\n", "cannot parse (File contains no section headers."),
    ("[mount]\nregion = us-east-1\nregion = us-east-2\n", "cannot parse (While reading from"),
    ("[mount]\n[mount]\n", "fix the file's INI syntax"),
]


@pytest.mark.parametrize("text, message", BAD_CASES)
def test_bad_values_raise_config_error_naming_file_section_key_value_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/etc/amazon/efs/efs-utils.conf")
    assert str(info.value).startswith("/etc/amazon/efs/efs-utils.conf: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_good_value_spellings() -> None:
    c = parse_config(
        "[mount]\nstunnel_check_cert_hostname = OFF\nstunnel_debug_enabled = 1\n"
        "dns_name_format = {fs_id}.efs.{region}.{dns_name_suffix}\n"
        "[efsplug]\nstunnel = stunnel5\n"
    ).config
    assert c.mount.stunnel_check_cert_hostname is False and c.mount.stunnel_debug_enabled is True
    assert c.mount.dns_name_format == "{fs_id}.efs.{region}.{dns_name_suffix}"
    assert c.efsplug.stunnel == "stunnel5"


def test_load_config_missing_file_means_defaults(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    loaded = load_config(missing, environ={})
    assert loaded.config.mount == MountConfig()
    assert loaded.warnings == [f"{missing}: not found; using built-in defaults"]


def test_load_config_from_env_and_from_path(tmp_path: Path) -> None:
    conf = tmp_path / "efs-utils.conf"
    conf.write_text("[mount]\nregion = ap-south-1\n")
    assert load_config(environ={CONFIG_ENV: str(conf)}).config.mount.region == "ap-south-1"
    assert load_config(conf, environ={CONFIG_ENV: "/nonexistent"}).config.source == str(conf)


def test_load_config_default_path_missing_is_silent(tmp_path: Path) -> None:
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip("this machine has a real efs-utils.conf")
    loaded = load_config(environ={})
    assert loaded.warnings == [] and loaded.config.source == str(DEFAULT_CONFIG_PATH)


def test_load_config_unreadable_or_binary(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read .*; fix its permissions or set EFSPLUG_CONFIG"):
        load_config(tmp_path, environ={})  # a directory
    binary = tmp_path / "bin.conf"
    binary.write_bytes(b"[mount]\nregion = \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary, environ={})
