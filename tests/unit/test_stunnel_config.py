"""TunnelSpec validation and the rendered stunnel client configuration."""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from efsplug import state
from efsplug.state import MountRecord
from efsplug.stunnel import TunnelSpec, render

DNS = "us-east-1a.fs-0123456789abcdef0.efs.us-east-1.amazonaws.com"
CA = "/etc/amazon/efs/efs-utils.crt"


def parse(text: str) -> Dict[str, List[List[str]]]:
    """{section: [[key, value], ...]}; '' is the global section."""
    sections: Dict[str, List[List[str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            assert line.endswith("]")
            current = line[1:-1]
            sections[current] = []
            continue
        key, sep, value = line.partition(" = ")
        assert sep, f"malformed line {line!r}"
        sections[current].append([key, value])
    return sections


def full_spec(**over: object) -> TunnelSpec:
    base = dict(
        accept_port=20049,
        connect_host=DNS,
        check_host=DNS,
        verify_level=2,
        cafile=CA,
        cert_file="/var/run/efs/fs-0123456789abcdef0+/certificate.pem",
        key_file="/etc/amazon/efs/privateKey.pem",
        ocsp=True,
        debug_log="/var/log/amazon/efs/fs-0123456789abcdef0.stunnel.log",
        pid_file="/var/run/efs/fs-0123456789abcdef0.pid",
    )
    base.update(over)
    return TunnelSpec(**base)  # type: ignore[arg-type]


def test_full_config_renders_every_directive() -> None:
    conf = parse(render(full_spec()))
    assert list(conf) == ["", "efs"]
    assert conf[""] == [
        ["foreground", "yes"],
        ["fips", "no"],
        ["socket", "l:SO_REUSEADDR=yes"],
        ["socket", "a:SO_BINDTODEVICE=lo"],
        ["socket", "l:TCP_NODELAY=1"],
        ["socket", "r:TCP_NODELAY=1"],
        ["debug", "debug"],
        ["output", "/var/log/amazon/efs/fs-0123456789abcdef0.stunnel.log"],
        ["pid", "/var/run/efs/fs-0123456789abcdef0.pid"],
    ]
    assert conf["efs"] == [
        ["client", "yes"],
        ["accept", "127.0.0.1:20049"],
        ["connect", f"{DNS}:2049"],
        ["sslVersionMin", "TLSv1.2"],
        ["renegotiation", "no"],
        ["TIMEOUTbusy", "20"],
        ["TIMEOUTclose", "0"],
        ["TIMEOUTidle", "70"],
        ["delay", "yes"],
        ["libwrap", "no"],
        ["verify", "2"],
        ["CAfile", CA],
        ["checkHost", DNS],
        ["OCSPaia", "yes"],
        ["cert", "/var/run/efs/fs-0123456789abcdef0+/certificate.pem"],
        ["key", "/etc/amazon/efs/privateKey.pem"],
    ]


def test_minimal_config_leaves_out_optional_directives() -> None:
    text = render(TunnelSpec(accept_port=21000, connect_host="10.0.0.12", verify_level=0))
    conf = parse(text)
    keys = {k for k, _ in conf[""] + conf["efs"]}
    assert not keys & {"debug", "output", "pid", "CAfile", "checkHost", "OCSPaia", "cert", "key"}
    assert ["connect", "10.0.0.12:2049"] in conf["efs"]
    assert ["verify", "0"] in conf["efs"]
    assert ["accept", "127.0.0.1:21000"] in conf["efs"]


def test_systemd_escaped_mount_dir_renders_verbatim() -> None:
    # state.escape_path writes "-" as "\\x2d" (every Docker volume path has dashes); stunnel
    # gives a backslash no meaning, so the path must reach the config unchanged.
    cert = "/var/run/efs/fs-0123456789abcdef0.var-lib-ecs-volumes-ecs\\x2dweb\\x2d3.20049/certificate.pem"
    conf = parse(render(full_spec(cert_file=cert)))
    assert ["cert", cert] in conf["efs"]


def test_fips_and_custom_connect_port() -> None:
    conf = parse(render(full_spec(fips=True, connect_port=12049)))
    assert ["fips", "yes"] in conf[""]
    assert ["connect", f"{DNS}:12049"] in conf["efs"]


@pytest.mark.parametrize("host", ["a", "fs-1.efs.eu-west-1.amazonaws.com", "x" * 63 + ".com", "192.0.2.7"])
def test_valid_hosts_accepted(host: str) -> None:
    assert TunnelSpec(accept_port=1, connect_host=host, verify_level=0).connect_host == host


INJECTIONS = ["a\nexec=/bin/sh", "x=y", "[evil]", "foo\r", "a b", "", "a\x00b", "\u00e9fs.example.com"]
STRING_FIELDS = ["connect_host", "check_host", "sni", "cafile", "cert_file", "key_file", "debug_log", "pid_file"]


@pytest.mark.parametrize("field_name", STRING_FIELDS)
@pytest.mark.parametrize("evil", INJECTIONS)
def test_injection_refused_in_every_string_field(field_name: str, evil: str) -> None:
    # As a path too: prefix a slash so only the evil part can be the reason.
    for value in (evil, "/etc/" + evil):
        over = {field_name: value}
        if field_name == "cert_file":
            over["key_file"] = "/k.pem"
        if field_name == "key_file":
            over["cert_file"] = "/c.pem"
        with pytest.raises(ValueError, match=field_name):
            full_spec(**over)


@pytest.mark.parametrize(
    "host",
    [
        "-bad.example.com",
        "bad-.example.com",
        "a..b",
        ".lead",
        "trail.",
        "x" * 64 + ".com",
        ("a" * 60 + ".") * 5,
        "999.1.1.1",
        "1.2.3",
        "host:2049",
        "[2001:db8::1]",
        "[2001:db8::1]:2049",
        "fe80::1%lo",
        "fe80::1%lo\nexec = /bin/sh",
        "2001:db8::1::2",
        "2001:db8:::1",
        "1:2:3:4:5:6:7:8:9",
        "a_b.example.com",
        "*.example.com",
    ],
)
def test_malformed_hosts_refused(host: str) -> None:
    with pytest.raises(ValueError, match="connect_host"):
        TunnelSpec(accept_port=1, connect_host=host, verify_level=0)
    with pytest.raises(ValueError, match="check_host"):
        full_spec(check_host=host)


def test_check_host_must_be_a_name_not_an_address() -> None:
    for address in ("192.0.2.1", "2001:db8::1"):
        with pytest.raises(ValueError, match="check_host"):
            full_spec(check_host=address)
        with pytest.raises(ValueError, match="sni"):
            full_spec(sni=address)


@pytest.mark.parametrize("host, connect", [
    ("2001:db8::25", "2001:db8::25:2049"),
    ("2001:0DB8:0:0:0:0:0:0025", "2001:db8::25:2049"),
    ("::1", "::1:2049"),
    ("fd00:ec2::a", "fd00:ec2::a:2049"),
])
def test_ipv6_target_renders_as_stunnel_parses_it(host: str, connect: str) -> None:
    """No brackets: stunnel splits the port off at the last colon and resolves the rest with
    getaddrinfo, which refuses "[::1]" (checked against stunnel 5.68), and takes "::1:2049"."""
    conf = parse(render(full_spec(connect_host=host, sni=DNS)))
    assert ["connect", connect] in conf["efs"]
    assert ["sni", DNS] in conf["efs"] and ["checkHost", DNS] in conf["efs"]
    assert "[" not in render(full_spec(connect_host=host)).split("[efs]", 1)[1]


def test_sni_only_when_asked() -> None:
    assert "sni" not in {k for k, _ in parse(render(full_spec()))["efs"]}


@pytest.mark.parametrize("path", ["relative/ca.pem", "/etc/", "/" + "a" * 4096, "~/ca.pem", "/etc/ca pem"])
def test_unsafe_or_malformed_paths_refused(path: str) -> None:
    with pytest.raises(ValueError, match="cafile"):
        full_spec(cafile=path)


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("accept_port", 0),
        ("accept_port", 65536),
        ("accept_port", "20049"),
        ("accept_port", True),
        ("accept_port", 20049.0),
        ("connect_port", 0),
        ("connect_port", 70000),
        ("verify_level", -1),
        ("verify_level", 4),
        ("verify_level", "2"),
        ("ocsp", "yes"),
        ("ocsp", 1),
        ("fips", None),
        ("connect_host", 12),
        ("cafile", b"/etc/ca.pem"),
    ],
)
def test_wrong_types_and_ranges_refused(field_name: str, value: object) -> None:
    with pytest.raises(ValueError, match=field_name):
        full_spec(**{field_name: value})


def test_cert_without_key_refused() -> None:
    with pytest.raises(ValueError, match="cert_file and key_file"):
        full_spec(key_file=None)
    with pytest.raises(ValueError, match="cert_file and key_file"):
        full_spec(cert_file=None)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_verification_needs_a_ca(level: int) -> None:
    with pytest.raises(ValueError, match="needs a cafile"):
        full_spec(cafile=None, check_host=None, verify_level=level)


def test_check_host_without_verification_refused() -> None:
    with pytest.raises(ValueError, match="check_host needs verify_level"):
        full_spec(verify_level=0)


def test_render_rechecks_a_tampered_spec() -> None:
    spec = full_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.cafile = "/x\n[evil]"  # type: ignore[misc]
    object.__setattr__(spec, "cafile", "/x\n[evil]")
    with pytest.raises(ValueError, match="cafile"):
        render(spec)


# Any mount point the kernel takes (no NUL, components of at most 255 bytes): the tunnel's
# files in its per-mount directory must be accepted and rendered unchanged.
_COMPONENT = st.text(st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)), min_size=1,
                     max_size=60).filter(lambda c: len(c.encode()) <= 255 and c not in (".", ".."))


def _accepted_and_rendered_unchanged(mountpoint: str) -> None:
    record = MountRecord(fs_id="fs-0123456789abcdef0", mountpoint=mountpoint, port=20049)
    mount_dir = "/var/run/efs/" + state.file_name(record)[: -len(state.SUFFIX)]
    spec = full_spec(cert_file=f"{mount_dir}/certificate.pem", key_file="/var/run/efs/privateKey.pem",
                     debug_log=f"{mount_dir}/stunnel.log")
    assert ["cert", f"{mount_dir}/certificate.pem"] in parse(render(spec))["efs"]


@given(st.lists(_COMPONENT, min_size=1, max_size=12))
def test_every_mount_point_gives_tunnel_paths_stunnel_takes(components: List[str]) -> None:
    _accepted_and_rendered_unchanged("/" + "/".join(components))


@pytest.mark.parametrize("mountpoint", [
    # A long ECS volume name (long task family): its directory name is cut and ends in ~<hash>.
    "/var/lib/ecs/volumes/ecs-" + "long-task-family-" * 12 + "3-data-e4b1c2d3e4f5a6b7c8d9",
    "/mnt/with:colon", "/mnt/ümlaut ünd space",
])
def test_long_and_unusual_mount_points(mountpoint: str) -> None:
    _accepted_and_rendered_unchanged(mountpoint)
