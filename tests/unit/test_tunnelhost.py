"""The shared stunnel process's pure parts: sections, host config, names, slots, the log."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from efsplug import config as cfg
from efsplug import tunnelhost
from efsplug.errors import ConfigError
from efsplug.tunnellog import read_tunnel_log
from efsplug.stunnel import HOST_MARKER, SERVICE_MARKER, TunnelSpec, render, render_host, render_service, service_name

SPEC = TunnelSpec(accept_port=20050, connect_host="192.0.2.4", check_host="fs-12345678.efs.us-east-1.amazonaws.com",
                  cafile="/etc/amazon/efs/efs-utils.crt", cert_file="/run/efs/m/certificate.pem",
                  key_file="/run/efs/privateKey.pem")


def test_a_section_is_the_tunnel_of_render_without_the_process_options() -> None:
    section = render_service(SPEC).splitlines()
    whole = render(SPEC).splitlines()
    assert section[0] == SERVICE_MARKER and section[1] == "[efs-20050]"
    # Every line of the per-mount service, plus the socket options a process would set for all.
    assert section[2:] == [line for line in whole if line.startswith("socket = ")] + whole[whole.index("[efs]") + 1:]
    assert not any(line.startswith(("foreground", "fips", "pid", "output", "debug")) for line in section)


@pytest.mark.parametrize("over", [{"debug_log": "/run/efs/m/stunnel.log"}, {"pid_file": "/run/efs/m/pid"}, {"fips": True}])
def test_process_wide_options_never_go_into_a_section(over: dict) -> None:
    with pytest.raises(ValueError, match="per process"):
        render_service(TunnelSpec(**{**SPEC.__dict__, **over}))


def test_host_config_includes_its_directory_and_refuses_a_path_that_could_add_directives() -> None:
    text = render_host("/run/efs/hosts/0123456789abcdef-0/services")
    assert text.splitlines() == [HOST_MARKER, "foreground = yes", "fips = no",
                                 "include = /run/efs/hosts/0123456789abcdef-0/services"]
    for evil in ("/run/efs/x\nexec = /bin/sh", "/run/efs/x = y", "/run/efs/[x]", "relative"):
        with pytest.raises(ValueError):
            render_host(evil)
    with pytest.raises(ValueError):
        service_name(0)


def test_tunnels_of_one_namespace_fill_a_process_then_get_the_next(tmp_path: Path) -> None:
    first = tunnelhost.host_for(tmp_path, None, "/usr/bin/stunnel", 2)
    assert first == tunnelhost.host_for(tmp_path, None, "/usr/bin/stunnel", 2)
    assert first != tunnelhost.host_for(tmp_path, "/var/run/netns/task", "/usr/bin/stunnel", 2)  # another namespace
    assert first != tunnelhost.host_for(tmp_path, None, "/usr/bin/stunnel5", 2)
    first.services.mkdir(parents=True)
    for port in (20050, 20051):
        os.symlink("../../../x/stunnel.conf", first.link(port))
    second = tunnelhost.host_for(tmp_path, None, "/usr/bin/stunnel", 2)
    assert second.directory.name == first.directory.name[:-1] + "1"
    assert tunnelhost.host_for(tmp_path, None, "/usr/bin/stunnel", 3) == first
    assert tunnelhost.hosts(tmp_path) == [first]  # only directories that exist


def test_sections_are_read_from_efsplugs_own_links_only(tmp_path: Path) -> None:
    host = tunnelhost.host_for(tmp_path, None, "stunnel", 8)
    host.services.mkdir(parents=True)
    os.symlink("../../../fs-12345678.mnt-a.20050/stunnel.conf", host.link(20050))
    os.symlink("/etc/passwd", host.services / "20051.conf")  # not a link efsplug makes
    (host.services / "20052.conf").write_text("[x]\n")  # not a link at all
    os.symlink("../../../m/other.conf", host.services / "20053.conf")
    found = tunnelhost.sections(host, time.time() + 5)
    assert [(s.port, s.stem) for s in found] == [(20050, "fs-12345678.mnt-a.20050")] and 4 < found[0].age < 10


def test_host_cmdline_is_recognised_by_its_place_only(tmp_path: Path) -> None:
    real = os.path.realpath(tmp_path)
    conf = f"{real}/hosts/0123456789abcdef-0/host.conf"
    (tmp_path / "hosts").mkdir()
    assert tunnelhost.is_host_cmdline(["stunnel", conf], real)
    assert not tunnelhost.is_host_cmdline(["stunnel", conf, "x"], real)
    assert not tunnelhost.is_host_cmdline(["stunnel", f"{real}/hosts/not-a-key/host.conf"], real)
    assert not tunnelhost.is_host_cmdline(["stunnel", f"{real}/other/0123456789abcdef-0/host.conf"], real)
    assert tunnelhost.host_of_config(tmp_path, conf) == tunnelhost.Host(Path(conf).parent)
    assert tunnelhost.host_of_config(tmp_path, "/etc/stunnel/host.conf") is None
    assert tunnelhost.host_of_config(tmp_path, f"{real}/hosts/../host.conf") is None
    assert tunnelhost.host_of_config(tmp_path, f"{real}/hosts/x/host.conf") is None


def test_a_malformed_identity_file_means_no_process(tmp_path: Path) -> None:
    host = tunnelhost.host_for(tmp_path, None, "stunnel", 8)
    host.directory.mkdir(parents=True)
    for text in ("", "[]", '{"pid": 1}', '{"pid": 1, "create_time": 0, "cmdline": 5}', "x" * 100000,
                 json.dumps({"pid": os.getpid(), "create_time": 0, "cmdline": ["stunnel", str(host.config)]})):
        host.identity_file.write_text(text)
        assert tunnelhost.running(host) is None


def test_reload_errors_are_stunnels_configuration_errors_only() -> None:
    text = ("2026.12.01 LOG5[ui]: Reading configuration from file /x\n"
            "2026.12.01 LOG3[4]: transfer: s_poll_wait: TIMEOUTclose exceeded: closing\n"
            "2026.12.01 LOG3[ui]: No trusted certificates found\n"
            "2026.12.01 LOG3[ui]: Service [efs-20050]: Failed to initialize TLS context\n"
            "2026.12.01 LOG3[ui]: Failed to reload the configuration file\n")
    assert tunnelhost.reload_errors(text) == "No trusted certificates found; Service [efs-20050]: Failed to initialize TLS context"
    assert tunnelhost.reload_errors("") == "no output"


def test_a_shared_log_counts_only_the_connections_of_its_own_section() -> None:
    log = ("LOG5[1]: Service [efs-20051] accepted connection from 127.0.0.1:1\n"
           "LOG5[2]: Service [efs-20050] accepted connection from 127.0.0.1:2\n"
           "LOG5[1]: Connection closed: 44 byte(s) sent to TLS, 0 byte(s) sent to socket\n"  # 20051 refused
           "LOG5[2]: Connection closed: 44 byte(s) sent to TLS, 128 byte(s) sent to socket\n"
           "LOG3[ui]: s_connect: connect 192.0.2.9:2049: Connection refused (111)\n")
    ours, other = read_tunnel_log(log * 12, "efs-20050"), read_tunnel_log(log * 12, "efs-20051")
    assert (ours.answered, ours.refused, ours.connect_error) == (12, 0, None)
    assert (other.answered, other.refused) == (0, 12) and other.hopeless
    assert read_tunnel_log(log * 12, "efs-29999") == type(ours)()


def test_the_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "efs-utils.conf"
    path.write_text("[efsplug]\ntunnel_process = shared\ntunnels_per_process = 4\n")
    loaded = cfg.load_config(path, {})
    assert (loaded.config.efsplug.tunnel_process, loaded.config.efsplug.tunnels_per_process) == ("shared", 4)
    assert cfg.EfsplugConfig().tunnel_process == "per-mount"
    for text, fix in (("tunnel_process = one", "use per-mount or shared"), ("tunnels_per_process = 0", "use a whole number from 1 to 1000")):
        path.write_text(f"[efsplug]\n{text}\n")
        with pytest.raises(ConfigError, match=f"\\[efsplug\\] {text.split()[0]} = .* is invalid; {fix}"):
            cfg.load_config(path, {})


def test_refused_ports_are_read_from_both_of_stunnels_error_forms() -> None:
    starting = "[ ] Initializing service [efs-1]\n[!] No trusted certificates found\n[!] Service [efs-20051]: Failed to initialize TLS context\n"
    reloading = "2026.12.01 LOG3[ui]: Service [efs-20052]: Failed to initialize TLS context\n2026.12.01 LOG5[3]: Service [efs-20053] accepted connection\n"
    assert tunnelhost.refused_ports(starting + reloading) == {20051, 20052}
