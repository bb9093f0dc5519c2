"""Making one EFS mount: locate, authorize, tunnel, record, mount — or leave nothing behind.

Shared by `mount.efs` and the Docker plugin (which calls `mount_efs` in process). Every
step that creates something registers its undo on an ExitStack; only a finished mount
keeps them. The state record is written as soon as the tunnel runs, before mount.nfs4,
so a crash mid-mount leaves a tunnel the supervisor owns, never an orphan.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Tuple

from efsplug import naming, ports, sharing, state
from efsplug.config import Config, MountConfig
from efsplug.errors import MountFailure, shown
from efsplug.fsutil import atomic_write, ensure_dir
from efsplug.imds import InstanceMetadata, MetadataUnavailable
from efsplug.netns import check_namespace
from efsplug.nfs import NfsMount, finish_mount as finish_nfs_mount
from efsplug.options import MountRequest, nfs_device, nfs_mount_options, parse_ip, validate_region
from efsplug.resolve import MountTarget, locate_mount_target
from efsplug.stunnel import TunnelSpec
from efsplug.tunnel import Tunnel, TunnelError

if TYPE_CHECKING:
    # Imported where used: cryptography and the credential sources cost a short-lived
    # mount.efs a noticeable share of its run, and plain or TLS-only mounts need neither.
    from efsplug.credentials import CredentialSource
    from efsplug.sigv4 import AwsCredentials

STUNNEL_NAMES = ("stunnel", "stunnel5", "stunnel4")
KEY_FILE = "privateKey.pem"
TUNNEL_LOG = "stunnel.log"  # stunnel's notices: why the mount target closed our connections


@dataclass
class Timings:
    """How long each phase took: `mount.efs -v` prints it, `scripts/bench mount` reads it."""

    phases: List[Tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - start))

    def line(self) -> str:
        return " ".join(f"{name}={seconds * 1000:.1f}ms" for name, seconds in self.phases)


@dataclass(frozen=True)
class Identity:
    """What authorizes the TLS connection: IAM credentials and where they came from."""

    credentials: Optional[AwsCredentials] = None
    source: Optional[CredentialSource] = None


@dataclass(frozen=True)
class Prepared:
    """Everything up to the kernel mount: the record (TLS mounts) and mount.nfs4's run."""

    record: Optional[state.MountRecord]
    nfs: NfsMount
    attempts: int
    attempt_timeout: float
    verbose: bool = False


def mount_efs(
    request: MountRequest,
    config: Config,
    *,
    environ: Mapping[str, str] = os.environ,
    timings: Optional[Timings] = None,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> Optional[state.MountRecord]:
    """Mount request.fs_id at request.mountpoint; the state record for TLS mounts, else None."""
    timings = timings or Timings()
    with contextlib.ExitStack() as undo:
        prepared = prepare_mount(request, config, environ=environ, timings=timings, now=now, undo=undo)
        if prepared is None:
            return None
        finish_mount(prepared, timings)
        undo.pop_all()  # the mount is made: everything created now belongs to it
    return prepared.record


def finish_mount(prepared: Prepared, timings: Timings) -> None:
    """mount.nfs4 for a prepared mount (efsplug.nfs.finish_mount); returns once the kernel has it."""
    with timings.phase("mount.nfs4"):
        finish_nfs_mount(prepared.nfs, attempts=prepared.attempts, attempt_timeout=prepared.attempt_timeout,
                         verbose=prepared.verbose, port=prepared.record.port if prepared.record else None)


def prepare_mount(
    request: MountRequest,
    config: Config,
    *,
    environ: Mapping[str, str],
    timings: Timings,
    now: Callable[[], datetime],
    undo: contextlib.ExitStack,
) -> Optional[Prepared]:
    """Locate, authorize, tunnel, record: all but the kernel mount (None for -f, fake).

    What it makes is undone by undo unless the caller pops it once the mount is made. Run
    by mount.efs itself, or for it by a resident efsplug (efsplug.handoff), which keeps
    imports and the private key warm.
    """
    _check_preconditions(request)
    imds = InstanceMetadata.from_environment(environ)
    with timings.phase("resolve"):
        region = find_region(request, config, environ, imds)
        mount_config = config.mount_for_region(region)
        if request.crossaccount:
            dns_name = naming.crossaccount_dns_name(request.fs_id, region, _crossaccount_az_id(config, imds),
                                                    config=config)
        else:
            dns_name = naming.dns_name(request.fs_id, region, az=request.az, config=config)
        target = locate_mount_target(
            fs_id=request.fs_id,
            region=region,
            dns_name=dns_name,
            mounttargetip=request.mounttargetip,
            availability_zone_id=lambda: config.fargate_az_id or _optional(imds.availability_zone_id),
            # efs-utils never falls back to a looked-up IP for crossaccount: the API is the other account's.
            fallback_enabled=mount_config.fall_back_to_mount_target_ip_address_enabled and not request.crossaccount,
            environ=environ,
        )
    if request.fake:
        return None
    if not request.tls:
        return _prepared(request, mount_config, None, nfs_device(target.address, request.path),
                         nfs_mount_options(request, tunnel_port=None))
    with timings.phase("credentials"):
        identity = _identity(request, environ, region)
    record = _start_tunnel(request, config, mount_config, region, target, identity, timings, now, undo)
    return _prepared(
        request, mount_config, record, f"127.0.0.1:{request.path}", nfs_mount_options(request, tunnel_port=record.port),
        tunnel_log=str(Path(str(record.config_file)).with_name(TUNNEL_LOG)), target=target.address,
        identity=_describe(identity),
    )


def find_region(request: MountRequest, config: Config, environ: Mapping[str, str], imds: InstanceMetadata) -> str:
    """Region from the option, AWS_REGION, AWS_DEFAULT_REGION, the config, then IMDS."""
    for candidate in (request.region, environ.get("AWS_REGION"), environ.get("AWS_DEFAULT_REGION"), config.mount.region):
        if candidate:
            return validate_region(candidate)
    try:
        return validate_region(imds.region())
    except MetadataUnavailable as exc:
        raise MountFailure(f"no region: pass -o region=<region> or set region in efs-utils.conf ({exc})") from None


def _crossaccount_az_id(config: Config, imds: InstanceMetadata) -> str:
    """This host's AZ id, which names the other account's mount target in the same zone."""
    if config.fargate_az_id:
        return config.fargate_az_id
    try:
        return imds.availability_zone_id()
    except MetadataUnavailable as exc:
        raise MountFailure(
            f"crossaccount needs this instance's availability zone id and instance metadata did not give it ({exc}); "
            "make IMDS reachable (hop limit 2 in containers)"
        ) from None


def _check_preconditions(request: MountRequest) -> None:
    if os.geteuid() != 0:
        raise MountFailure("mount.efs must run as root; use sudo")
    if request.mountpoint and not os.path.isdir(request.mountpoint):
        raise MountFailure(f"mount point {shown(request.mountpoint)} is not a directory; create it with mkdir -p")
    if request.netns:
        check_namespace(request.netns)


def _identity(request: MountRequest, environ: Mapping[str, str], region: str) -> Identity:
    if not request.iam:
        return Identity()
    from efsplug import credentials
    try:
        found, source = credentials.find_credentials(
            awsprofile=request.awsprofile, awscredsuri=request.awscredsuri, rolearn=request.rolearn,
            jwtpath=request.jwtpath, region=region, environ=environ,
        )
    except credentials.CredentialsUnavailable as exc:
        raise MountFailure(str(exc)) from None
    return Identity(found, source)


def _start_tunnel(
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
    binary = _stunnel_binary(config)
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
        spec = _tunnel_spec(
            accept_port=reservation.port, cert_file=cert_file, key_file=key_file,
            debug_log=str(mount_dir / TUNNEL_LOG) if mount_config.stunnel_debug_enabled else None, **settings,
        )
        with timings.phase("tunnel"):
            try:
                tunnel = Tunnel.start(
                    spec, config_path=mount_dir / "stunnel.conf", stunnel_binary=binary,
                    netns=request.netns, log_path=mount_dir / TUNNEL_LOG,
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


def _describe(identity: Identity) -> Optional[str]:
    """Which IAM identity the certificate carried: its source and access key id, never a secret."""
    if identity.credentials is None:
        return None
    return f"IAM identity {identity.source} (access key {identity.credentials.access_key_id})"


def _prepared(
    request: MountRequest,
    mount_config: MountConfig,
    record: Optional[state.MountRecord],
    source: str,
    options: str,
    *,
    tunnel_log: Optional[str] = None,
    target: str = "the mount target",
    identity: Optional[str] = None,
) -> Prepared:
    flags = [flag for flag, on in (("-n", request.no_mtab), ("-s", request.sloppy), ("-v", request.verbose)) if on]
    attempts = mount_config.retry_nfs_mount_command_count if mount_config.retry_nfs_mount_command else 1
    return Prepared(
        record,
        NfsMount(source, str(request.mountpoint), options, netns=request.netns, flags=flags,
                 access_point=request.accesspoint, tunnel_log=tunnel_log, target=target, identity=identity),
        attempts=attempts,
        attempt_timeout=float(mount_config.retry_nfs_mount_command_timeout_sec),
        verbose=request.verbose,
    )


def _port_range(request: MountRequest, mount_config: MountConfig) -> Tuple[int, int]:
    if request.tlsport:
        return request.tlsport, request.tlsport + 1
    return mount_config.port_range_lower_bound, mount_config.port_range_upper_bound


def _stunnel_binary(config: Config) -> str:
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


def _optional(getter: Callable[[], str]) -> Optional[str]:
    try:
        return getter()
    except MetadataUnavailable:
        return None


def _is_ipv6(address: str) -> bool:
    try:
        return parse_ip(address).version == 6
    except ValueError:
        return False  # a DNS name
