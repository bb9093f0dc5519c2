"""Making one EFS mount: locate, authorize, tunnel, record, mount — or leave nothing behind.

Shared by `mount.efs` and the Docker plugin (which calls `mount_efs` in process). Every
step that creates something registers its undo on an ExitStack; only a finished mount
keeps them. The state record is written as soon as the tunnel runs, before mount.nfs4,
so a crash mid-mount leaves a tunnel the supervisor owns, never an orphan.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple

from efsplug import naming, state
from efsplug.config import Config, MountConfig
from efsplug.errors import MountFailure, shown
from efsplug.imds import InstanceMetadata, MetadataUnavailable
from efsplug.mounttunnel import Identity, start_tunnel, tunnel_log_path, tunnel_service
from efsplug.netns import check_namespace
from efsplug.nfs import NfsMount, finish_mount as finish_nfs_mount
from efsplug.options import MountRequest, nfs_device, nfs_mount_options, validate_region
from efsplug.optionvalues import check_printable
from efsplug.resolve import MountTarget, locate_mount_target



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
    request = _checked(request)
    imds = InstanceMetadata.from_environment(environ)
    with timings.phase("resolve"):
        region = find_region(request, config, environ, imds)
        mount_config = config.mount_for_region(region)
        target = mount_target(request, config, region, imds, environ)
    if request.fake:
        return None
    if not request.tls:
        return _prepared(request, mount_config, None, nfs_device(target.address, request.path),
                         nfs_mount_options(request, tunnel_port=None))
    with timings.phase("credentials"):
        identity = identity_for(request, environ, region)
    record = start_tunnel(request, config, mount_config, region, target, identity, timings, now, undo)
    return _prepared(
        request, mount_config, record, f"127.0.0.1:{request.path}", nfs_mount_options(request, tunnel_port=record.port),
        tunnel_log=str(tunnel_log_path(record)), tunnel_service=tunnel_service(record), target=target.address,
        identity=describe_identity(identity),
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


def mount_target(request: MountRequest, config: Config, region: str, imds: InstanceMetadata,
                 environ: Mapping[str, str]) -> MountTarget:
    """Where the mount connects: the file system's (or the cross-account, or the AZ's) DNS
    name, else a mount target IP from the EFS API (MountFailure says why neither works)."""
    if request.crossaccount:
        dns_name = naming.crossaccount_dns_name(request.fs_id, region, _crossaccount_az_id(config, imds), config=config)
    else:
        dns_name = naming.dns_name(request.fs_id, region, az=request.az, config=config)
    return locate_mount_target(
        fs_id=request.fs_id,
        region=region,
        dns_name=dns_name,
        mounttargetip=request.mounttargetip,
        availability_zone_id=lambda: config.fargate_az_id or _optional(imds.availability_zone_id),
        # efs-utils never falls back to a looked-up IP for crossaccount: the API is the other account's.
        fallback_enabled=(config.mount_for_region(region).fall_back_to_mount_target_ip_address_enabled
                          and not request.crossaccount),
        environ=environ,
    )


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


def _checked(request: MountRequest) -> MountRequest:
    """request, runnable here, with its mount point as the kernel's table will name it."""
    if os.geteuid() != 0:
        raise MountFailure("mount.efs must run as root; use sudo")
    if request.mountpoint and not os.path.isdir(request.mountpoint):
        raise MountFailure(f"mount point {shown(request.mountpoint)} is not a directory; create it with mkdir -p")
    if request.netns:
        check_namespace(request.netns)
    if request.mountpoint:
        # The kernel records the resolved path, as mount(8) passes it; a record naming a
        # symlink would not match its own mount, and the supervisor would think it gone.
        real = os.path.realpath(request.mountpoint)
        if real != request.mountpoint:
            check_printable("mount point", real)
            request = replace(request, mountpoint=real)
    return request


def identity_for(request: MountRequest, environ: Mapping[str, str], region: str) -> Identity:
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


def describe_identity(identity: Identity) -> Optional[str]:
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
    tunnel_service: Optional[str] = None,
    target: str = "the mount target",
    identity: Optional[str] = None,
) -> Prepared:
    flags = [flag for flag, on in (("-n", request.no_mtab), ("-s", request.sloppy), ("-v", request.verbose)) if on]
    attempts = mount_config.retry_nfs_mount_command_count if mount_config.retry_nfs_mount_command else 1
    return Prepared(
        record,
        NfsMount(source, str(request.mountpoint), options, netns=request.netns, flags=flags,
                 access_point=request.accesspoint, tunnel_log=tunnel_log, tunnel_service=tunnel_service,
                 target=target, identity=identity),
        attempts=attempts,
        attempt_timeout=float(mount_config.retry_nfs_mount_command_timeout_sec),
        verbose=request.verbose,
    )


def _optional(getter: Callable[[], str]) -> Optional[str]:
    try:
        return getter()
    except MetadataUnavailable:
        return None

