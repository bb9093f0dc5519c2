"""The tunnel a mount goes through: join a live one with the same identity, or start one.

Part of efsplug.mount's prepare step: a port, the per-mount directory, the IAM
certificate, stunnel, and the state record, each undone on the caller's ExitStack until
the mount is made. Once the record is saved another mount may join the tunnel, so from
then on undoing is unmount.release(), which stops the tunnel only if nobody else uses it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

from efsplug import ports, sharing, state, tunnelhost
from efsplug.config import Config, MountConfig
from efsplug.errors import MountFailure
from efsplug.fsutil import atomic_write, ensure_dir
from efsplug.options import MountRequest, parse_ip
from efsplug.resolve import MountTarget
from efsplug.stunnel import TunnelSpec, render_service, service_name
from efsplug.tunnel import Tunnel, TunnelError

if TYPE_CHECKING:
    from efsplug.credentials import CredentialSource
    from efsplug.mount import Timings
    from efsplug.sigv4 import AwsCredentials

STUNNEL_NAMES = ("stunnel", "stunnel5", "stunnel4")
KEY_FILE = "privateKey.pem"
TUNNEL_LOG = "stunnel.log"  # stunnel's notices: why the mount target closed our connections
# How long a new stunnel may take to listen. A stunnel that fails exits and is reported at
# once, so this only bounds a hung one; a loaded host mounting many file systems at once
# (20 in parallel on a busy one-CPU guest) has taken over 10 s, and failed mounts there.
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Identity:
    """What authorizes the TLS connection: IAM credentials and where they came from."""

    credentials: Optional[AwsCredentials] = None
    source: Optional[CredentialSource] = None


def start_tunnel(
    request: MountRequest,
    config: Config,
    mount_config: MountConfig,
    region: str,
    target: MountTarget,
    identity: Identity,
    timings: Timings,
    now: Callable[[], datetime],
    undo: contextlib.ExitStack,
) -> state.MountRecord:
    """Join a live tunnel with the same settings and identity, or start one; record it.

    Once the record is saved another mount may join the tunnel, so from then on undoing
    means unmount.release(), which stops the tunnel only if no other record uses it.
    """
    state_dir = ensure_dir(Path(config.efsplug.state_dir), config.default.state_file_dir_mode)
    settings = dict(
        connect_host=target.address,
        check_host=target.dns_name if mount_config.stunnel_check_cert_hostname else None,
        sni=target.dns_name if _is_ipv6(target.address) else None,  # as efs-utils does for IPv6 targets
        verify_level=request.verify if request.verify is not None else 2,
        cafile=request.cafile or mount_config.stunnel_cafile,
        ocsp=request.ocsp if request.ocsp is not None else mount_config.stunnel_check_cert_validity,
        fips=mount_config.fips_mode_enabled,
    )
    binary = stunnel_binary(config)
    template = state.MountRecord(
        fs_id=request.fs_id, mountpoint=str(request.mountpoint), path=request.path,
        access_point=request.accesspoint, netns=request.netns, region=region, tls=True, iam=request.iam,
        credential_source=identity.source.persisted if identity.source else None,
        credential_expiry=identity.credentials.expiry if identity.credentials else None,
        share_key=sharing.share_key(
            fs_id=request.fs_id, access_point=request.accesspoint, region=region, netns=request.netns,
            iam=request.iam, credential_source=identity.source.persisted if identity.source else None,
            tunnel={**settings, "debug": mount_config.stunnel_debug_enabled, "stunnel": binary,
                    "key": str(state_dir / KEY_FILE)},
        ),
    )
    if not request.tlsport:  # a port asked for by number is this mount's own
        with timings.phase("share"):
            joined = sharing.join(state_dir, template.share_key, template, lambda r: _fresh_dir(_own_dir(state_dir, r)),
                                  now())
        if joined is not None:
            undo.callback(_release, joined, state_dir)
            return joined
    with contextlib.ExitStack() as before_record:
        record = _new_tunnel(request, config, mount_config, region, identity, timings, now, state_dir, template,
                             settings, binary, before_record)
        state.save(state_dir, record)
        before_record.pop_all()
    undo.callback(_release, record, state_dir)
    return record


def _new_tunnel(
    request: MountRequest,
    config: Config,
    mount_config: MountConfig,
    region: str,
    identity: Identity,
    timings: Timings,
    now: Callable[[], datetime],
    state_dir: Path,
    template: state.MountRecord,
    settings: dict,
    binary: str,
    undo: contextlib.ExitStack,
) -> state.MountRecord:
    """A port, a per-mount directory, the certificate and a listening stunnel: the record to save."""
    with timings.phase("port"):
        lower, upper = _port_range(request, mount_config)
        try:
            reservation = ports.reserve_port(state_dir / "ports", lower, upper)
        except ports.PortRangeExhausted as exc:
            raise MountFailure(str(exc)) from None
    with reservation:
        record = replace(template, port=reservation.port)
        mount_dir = _own_dir(state_dir, record)
        _fresh_dir(mount_dir)
        undo.callback(shutil.rmtree, mount_dir, True)
        cert_file = key_file = None
        if request.iam or request.accesspoint:
            with timings.phase("certificate"):
                key_path = state_dir / KEY_FILE
                cert_file, record = _write_certificate(request, config, region, identity, key_path, mount_dir, record, now())
                key_file = str(key_path)
        shared = config.efsplug.tunnel_process == "shared" and not mount_config.stunnel_debug_enabled \
            and not settings["fips"]  # a debug log and FIPS mode are a whole process's settings
        spec = _tunnel_spec(
            accept_port=reservation.port, cert_file=cert_file, key_file=key_file,
            debug_log=str(mount_dir / TUNNEL_LOG) if mount_config.stunnel_debug_enabled else None, **settings,
        )
        with timings.phase("tunnel"):
            try:
                if shared:
                    return _hosted_tunnel(spec, mount_dir, state_dir, binary, request.netns,
                                          config.efsplug.tunnels_per_process, record, now(), undo)
                tunnel = Tunnel.start(
                    spec, config_path=mount_dir / "stunnel.conf", stunnel_binary=binary,
                    netns=request.netns, log_path=mount_dir / TUNNEL_LOG, ready_timeout=READY_TIMEOUT,
                )
            except (TunnelError, OSError) as exc:
                raise MountFailure(f"TLS tunnel to {spec.connect_host} did not start: {exc}{_tunnel_hint(exc, spec)}") from None
            undo.callback(tunnel.stop)
    return replace(
        record,
        tunnel=tunnel.identity,
        config_file=str(mount_dir / "stunnel.conf"),
        files_created=[str(mount_dir)],
        mount_time=now(),
    )


def _hosted_tunnel(spec: TunnelSpec, mount_dir: Path, state_dir: Path, binary: str, netns: Optional[str],
                   capacity: int, record: state.MountRecord, when: datetime,
                   undo: contextlib.ExitStack) -> state.MountRecord:
    """The tunnel as a section of a shared stunnel process of its namespace (efsplug.tunnelhost)."""
    section = mount_dir / "stunnel.conf"
    atomic_write(section, render_service(spec).encode(), 0o600)
    host, identity = tunnelhost.place(state_dir, netns, binary, capacity, spec.accept_port, section,
                                      ready_timeout=READY_TIMEOUT)
    undo.callback(tunnelhost.remove, host, spec.accept_port)
    return replace(record, tunnel=identity, config_file=str(section), host_config=str(host.config),
                   version=state.HOSTED_VERSION, files_created=[str(mount_dir)], mount_time=when)


def tunnel_log_path(record: state.MountRecord) -> Path:
    """Where the stunnel serving record's tunnel writes: its own log, or its shared process's."""
    if record.host_config:
        return Path(record.host_config).with_name(TUNNEL_LOG)
    return Path(str(record.config_file)).with_name(TUNNEL_LOG)


def tunnel_service(record: state.MountRecord) -> Optional[str]:
    """The name of record's section in its shared process's log; None: the log is its own."""
    return service_name(record.port) if record.host_config and record.port else None


def _own_dir(state_dir: Path, record: state.MountRecord) -> Path:
    return state_dir / state.file_name(record)[: -len(state.SUFFIX)]


def _release(record: state.MountRecord, state_dir: Path) -> None:
    """Undo a recorded mount that was not made: its record, and its tunnel unless shared."""
    from efsplug.unmount import UnmountError, release

    try:
        release(record, state_dir=state_dir, failed_mount=True)
    except UnmountError:
        pass  # the record stays: the supervisor reaps it; the mount's own error is what to tell


def _fresh_dir(mount_dir: Path) -> Path:
    """Make the per-mount directory; one already there is a killed mount's leftover.

    Its name holds the port this mount has just reserved, so no live tunnel can own it.
    """
    try:
        mount_dir.mkdir(mode=0o700)
        return mount_dir
    except FileExistsError:
        pass
    if mount_dir.is_symlink() or not mount_dir.is_dir():
        raise MountFailure(f"{mount_dir} exists and is not a directory efsplug made; move it away")
    shutil.rmtree(mount_dir)
    mount_dir.mkdir(mode=0o700)
    return mount_dir


def _tunnel_spec(**fields) -> TunnelSpec:
    """TunnelSpec validates every value again; a refusal there is the operator's input."""
    try:
        return TunnelSpec(**fields)
    except ValueError as exc:
        raise MountFailure(f"cannot build the tunnel configuration: {exc}") from None


def _write_certificate(
    request: MountRequest,
    config: Config,
    region: str,
    identity: Identity,
    key_path: Path,
    mount_dir: Path,
    record: state.MountRecord,
    when: datetime,
) -> Tuple[str, state.MountRecord]:
    from efsplug import certificate

    key = certificate.load_or_create_private_key(key_path)
    cert_request = certificate.certificate_request(
        fs_id=request.fs_id, region=region, hostname=socket.gethostname(), now=when,
        access_point=request.accesspoint, credentials=identity.credentials,
        lifetime=timedelta(minutes=config.efsplug.cert_lifetime_min), client_source=config.client_info.source,
    )
    cert_path = mount_dir / "certificate.pem"
    atomic_write(cert_path, certificate.certificate_pem(certificate.build_certificate(key, cert_request)), 0o600)
    return str(cert_path), replace(record, cert_not_before=cert_request.not_before, cert_not_after=cert_request.not_after)


def _port_range(request: MountRequest, mount_config: MountConfig) -> Tuple[int, int]:
    if request.tlsport:
        return request.tlsport, request.tlsport + 1
    return mount_config.port_range_lower_bound, mount_config.port_range_upper_bound


def stunnel_binary(config: Config) -> str:
    for name in ([config.efsplug.stunnel] if config.efsplug.stunnel else STUNNEL_NAMES):
        found = shutil.which(name)
        if found:
            return found
    raise MountFailure("stunnel not found; install stunnel (stunnel4 on Debian, stunnel5 on Amazon Linux)")


def _tunnel_hint(exc: Exception, spec: TunnelSpec) -> str:
    text = str(exc)
    if "No trusted certificates found" in text or "CAfile" in text:
        return f"; the CA bundle {spec.cafile} is missing or empty: set stunnel_cafile in efs-utils.conf or pass cafile="
    return ""


def _is_ipv6(address: str) -> bool:
    try:
        return parse_ip(address).version == 6
    except ValueError:
        return False  # a DNS name
