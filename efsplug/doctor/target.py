"""The checks for one file system and the options a mount would use, in the mount's order.

Each step calls what `mount -t efs` calls (efsplug.mount's region, naming and mount target
lookup, the credentials chain, mounttunnel.start_tunnel), so the doctor and the mount
cannot disagree; the last step sends an NFS NULL call through a short-lived tunnel (or
straight to port 2049 without TLS) and removes everything it made.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, List, Mapping, Optional

from efsplug.doctor import rpc
from efsplug.doctor.checks import Check, NotApplicable, Problem
from efsplug.doctor.host import HostChecks
from efsplug.errors import EfsplugError
from efsplug.imds import InstanceMetadata, MetadataUnavailable
from efsplug.options import MountRequest, request_from_driver_opts
from efsplug.resolve import CONNECT_CHECK_SECONDS, NFS_PORT, MountTarget

NULL_TIMEOUT = 15.0  # the NULL call's connect and answer, through the tunnel
TUNNEL_CHECK_TIMEOUT = 60.0
NO_METADATA_FIX = ("aws ec2 modify-instance-metadata-options --http-put-response-hop-limit 2 lets containers reach it; "
                   "or pass region= and awsprofile= or awscredsuri=")


class TargetChecks:
    def __init__(self, spec: str, options: str, host: HostChecks, environ: Mapping[str, str] = os.environ) -> None:
        self.spec, self.options, self.host, self.environ = spec, options, host, environ
        self.imds = InstanceMetadata.from_environment(environ)
        self.request: Optional[MountRequest] = None
        self.region = ""
        self.target: Optional[MountTarget] = None
        self.identity: Any = None
        self._parsed: Optional[MountRequest] = None  # by checks(): the options decide which checks apply
        self._refused: Optional[EfsplugError] = None

    def checks(self) -> List[Check]:
        try:  # the shape of what follows depends on the options; their check reports any error
            request: Optional[MountRequest] = request_from_driver_opts(self.spec, self.options)
        except EfsplugError as exc:
            request, self._refused = None, exc
        self._parsed = request
        region_imds = request is not None and not self._region_given(request)
        creds_imds = request is not None and request.iam and self._instance_role_likely(request)
        tls = request is None or request.tls
        return [
            Check("options", f"the device {self.spec} and options {self.options or '(none)'}", self.parse,
                  needs=("config",)),
            Check("imds", "instance metadata (IMDSv2), where region or credentials come from it", self.metadata,
                  needs=("options",)),
            Check("region", "the file system's region", self.find_region,
                  needs=("options",) + (("imds",) if region_imds else ())),
            Check("dns", "the mount target's DNS name resolves", self.locate, needs=("region",)),
            Check("port-2049", "the mount target accepts TCP 2049", self.port_2049, needs=("dns",)),
            Check("credentials", "IAM credentials for iam", self.credentials,
                  needs=("region",) + (("imds",) if creds_imds else ())),
            Check("access-point", "the access point exists, is available and belongs to the file system",
                  self.access_point, needs=("region",)),
            Check("nfs", "a TLS handshake and an NFS NULL call through a short-lived tunnel" if tls
                  else "an NFS NULL call to port 2049", self.nfs_null if not tls else self.tunnel_null,
                  needs=("port-2049", "credentials", "access-point", "stunnel", "state-dir", "ports") if tls
                  else ("port-2049",), timeout=TUNNEL_CHECK_TIMEOUT, threaded=not tls),
        ]

    # ---- options, metadata, region ------------------------------------------------------

    def parse(self) -> str:
        if self._parsed is None:
            assert self._refused is not None, "checks() parses the options first"
            raise self._refused  # UsageError: the option and its fix
        self.request = self._parsed
        if self.request.netns:
            from efsplug.netns import check_namespace

            check_namespace(self.request.netns)
        return ", ".join(part for part in (
            "tls" if self.request.tls else "no tls", "iam" if self.request.iam else "",
            f"access point {self.request.accesspoint}" if self.request.accesspoint else "") if part)

    def _region_given(self, request: MountRequest) -> bool:
        config = self.host.config
        return bool(request.region or self.environ.get("AWS_REGION") or self.environ.get("AWS_DEFAULT_REGION")
                    or config.mount.region)

    def _instance_role_likely(self, request: MountRequest) -> bool:
        explicit = request.awsprofile or request.awscredsuri or (request.rolearn and request.jwtpath)
        from_env = any(self.environ.get(k) for k in (
            "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_ROLE_ARN"))
        return not explicit and not from_env

    def metadata(self) -> str:
        request = self._request()
        uses = [what for what, used in (
            ("the region", not self._region_given(request)),
            ("the instance role's credentials", request.iam and self._instance_role_likely(request))) if used]
        if not uses:
            raise NotApplicable("region and credentials come from elsewhere")
        if self.imds.disabled:
            raise Problem(f"instance metadata is disabled (AWS_EC2_METADATA_DISABLED), and {' and '.join(uses)} "
                          "would come from it", "pass region= and awsprofile= or awscredsuri=")
        try:
            region = self.imds.region()
        except MetadataUnavailable as exc:
            raise Problem(f"{exc}; {' and '.join(uses)} would come from it", NO_METADATA_FIX) from None
        return f"{self.imds.endpoint} answers (region {region}); used for {' and '.join(uses)}"

    def find_region(self) -> str:
        from efsplug.mount import find_region

        self.region = find_region(self._request(), self.host.config, self.environ, self.imds)
        return self.region

    # ---- where to connect ---------------------------------------------------------------

    def locate(self) -> str:
        from efsplug.mount import mount_target

        self.target = mount_target(self._request(), self.host.config, self.region, self.imds, self.environ)
        return f"{self.target.address} (by {self.target.via})"

    def port_2049(self) -> str:
        target = self._target()
        try:
            with self._connect(target.address, NFS_PORT, CONNECT_CHECK_SECONDS):
                pass
        except OSError as exc:
            raise Problem(f"mount target {target.address} does not answer on port {NFS_PORT} "
                          f"({exc.strerror or type(exc).__name__})",
                          f"allow inbound TCP {NFS_PORT} from this host in the mount target's security group") from None
        return f"{target.address}:{NFS_PORT} accepts connections"

    # ---- who we are ---------------------------------------------------------------------

    def credentials(self) -> str:
        from efsplug.mount import describe_identity, identity_for

        request = self._request()
        if not request.iam:
            raise NotApplicable("no iam option")
        self.identity = identity_for(request, self.environ, self.region)  # MountFailure: tried what, and the fix
        return describe_identity(self.identity) or ""

    def access_point(self) -> str:
        from efsplug.accesspoints import AccessPointError, AccessPoints

        request = self._request()
        if not request.accesspoint:
            raise NotApplicable("no accesspoint option")
        try:
            found = AccessPoints(self.region, call_deadline=10.0).describe(request.fs_id, request.accesspoint)
        except AccessPointError as exc:  # the API is not the mount's path: cannot check is not a failure
            raise NotApplicable(f"cannot ask the EFS API ({exc})") from None
        except Exception as exc:  # botocore without credentials or region support, say
            raise NotApplicable(f"cannot ask the EFS API ({type(exc).__name__})") from None
        if found is None:
            raise Problem(f"access point {request.accesspoint} does not exist in {self.region}",
                          f"check accesspoint= (aws efs describe-access-points --file-system-id {request.fs_id})")
        if found.get("FileSystemId") != request.fs_id:
            raise Problem(f"access point {request.accesspoint} belongs to {found.get('FileSystemId')}, not "
                          f"{request.fs_id}", "mount the file system the access point belongs to")
        if found.get("LifeCycleState") != "available":
            raise Problem(f"access point {request.accesspoint} is {found.get('LifeCycleState')}",
                          "wait until it is available, or create it again")
        root = (found.get("RootDirectory") or {}).get("Path", "/")
        user = found.get("PosixUser") or {}
        return f"root {root}" + (f", uid {user.get('Uid')} gid {user.get('Gid')}" if user else "")

    # ---- the NFS path ---------------------------------------------------------------------

    def nfs_null(self) -> str:
        target = self._target()
        with self._connect(target.address, NFS_PORT, NULL_TIMEOUT) as sock:
            reply = rpc.call_null(sock)
        if not reply.accepted:
            raise Problem(f"the mount target {target.address} refused an NFS call ({reply.detail})",
                          "the file system policy may require IAM authorization: use tls,iam")
        return f"{target.address}:{NFS_PORT} answered"

    def tunnel_null(self) -> str:
        from efsplug.mount import Timings, describe_identity
        from efsplug.mounttunnel import Identity, start_tunnel, tunnel_log_path, tunnel_service
        from efsplug.nfs import NfsMount
        from efsplug.tunnellog import read_tunnel_log, tunnel_diagnosis

        request, target, config = self._request(), self._target(), self.host.config
        # A mountpoint nobody uses: the record (gone at the end) must name one.
        probe = replace(request, mountpoint=f"/run/efsplug-doctor-{os.getpid()}-{threading.get_ident()}")
        with contextlib.ExitStack() as undo:  # everything made is undone: tunnel, port, record, certificate
            record = start_tunnel(probe, config, config.mount_for_region(self.region), self.region, target,
                                  self.identity or Identity(), Timings(), lambda: datetime.now(timezone.utc), undo)
            log_path = tunnel_log_path(record)
            try:
                with self._connect("127.0.0.1", int(record.port or 0), NULL_TIMEOUT) as sock:
                    reply = rpc.call_null(sock)
            except (OSError, ValueError) as exc:
                verdict = read_tunnel_log(_read_text(log_path), tunnel_service(record))
                mount = NfsMount("", probe.mountpoint or "", "", access_point=request.accesspoint,
                                 target=target.address, identity=describe_identity(self.identity) if self.identity else None)
                diagnosis = tunnel_diagnosis(verdict, mount)  # the mount's own words: cause and what to check
                if diagnosis:
                    raise Problem(diagnosis) from None
                raise Problem(f"the tunnel to {target.address} closed the NFS call unanswered ({exc})",
                              "set stunnel_debug_enabled = true in efs-utils.conf and look at the tunnel's log") from None
        if not reply.accepted:
            who = describe_identity(self.identity) if self.identity else "this client (no IAM identity was sent)"
            where = f"access point {request.accesspoint}" if request.accesspoint else "the file system"
            raise Problem(f"the mount target {target.address} refused {who} for {where} ({reply.detail})",
                          "check that the credentials are valid and current and that the file system policy allows "
                          "them elasticfilesystem:ClientMount (and ClientWrite to write)")
        return f"through 127.0.0.1:{record.port} to {target.address}, answered; tunnel removed"

    # ---- helpers ------------------------------------------------------------------------

    def _request(self) -> MountRequest:
        assert self.request is not None, "the options check comes first"
        return self.request

    def _target(self) -> MountTarget:
        assert self.target is not None, "the dns check comes first"
        return self.target

    def _connect(self, host: str, port: int, timeout: float) -> socket.socket:
        """A connection from the mount's network namespace (netns=), as its tunnel makes them."""
        netns = self._request().netns
        if not netns:
            return socket.create_connection((host, port), timeout=timeout)
        return _in_namespace(netns, lambda: socket.create_connection((host, port), timeout=timeout))


def _in_namespace(netns: str, make: Any) -> Any:
    """make() run on a thread that entered netns: the socket it returns stays in that namespace."""
    from efsplug.netns import CLONE_NEWNET, opened, setns_function

    outcome: dict = {}

    def run() -> None:
        try:
            with opened(netns) as fd:
                setns_function()(fd, CLONE_NEWNET)  # this thread only; it ends right after
            outcome["value"] = make()
        except BaseException as exc:  # handed back to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="efsplug-doctor-netns")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""

