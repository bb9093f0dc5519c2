"""The whole local EFS: one file system with two access points, its TLS mount target, the
AWS APIs and metadata services, and a real Linux kernel to mount it from.

    with Bed(workdir) as bed:
        bed.guest.run(["mount", "-t", "efs", bed.fs_id, "/mnt/efs", "-o", "tls,iam"])

Inside the guest the product runs with its real defaults: the file system's DNS name
resolves (guest /etc/hosts) to the mount target IP moto assigned (TEST-NET), and the
guest relays that IP's port 2049 to the emulated endpoint, 169.254.169.254:80 to the
instance metadata service and 169.254.170.2:80 to the ECS credentials endpoint (guest.py).
Only the CA bundle is configured, in the guest's efs-utils.conf, as an operator would.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from efsbed import procs
from efsbed.aws import MotoServer, SeededFs, seed_file_system
from efsbed.ca import BedCA
from efsbed.credentials import BedCredentials
from efsbed.endpoint import EfsEndpoint
from efsbed.ganesha import Ganesha
from efsbed.guest import Forward, Guest, GuestResult
from efsbed.metadata import InstanceMetadata, TaskCredentials
from efsbed.sts import WebIdentitySts

REPO = Path(__file__).resolve().parents[2]
MOUNT_EFS = REPO / ".venv" / "bin" / "mount.efs"
IMDS_IP, ECS_IP = "169.254.169.254", "169.254.170.2"
# The mount target's IPv6 address (documentation prefix): its 2049 reaches the same TLS
# endpoint, as a dual-stack EFS mount target's does.
MT_IPV6 = "2001:db8:ef5::2049"
# An NFS server without TLS or EFS in front: ganesha's root export, for type=nfs4 volumes.
NFS_IP = "203.0.113.49"
# The EFS API (the bed's moto), for the agent's access points on demand in the guest.
EFS_API_IP = "203.0.113.80"


@dataclass(frozen=True)
class AccessPoint:
    id: str  # fsap- + 17 hex, as EFS makes them (moto's are shorter)
    root: str  # its root directory inside the file system
    export_dir: Path  # where that directory lives on the host


class Bed:
    def __init__(
        self,
        workdir: Path,
        *,
        region: str = "us-east-1",
        az: str = "us-east-1a",
        iam_required: bool = False,
        with_guest: bool = True,
        guest_systemd: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.region, self.az = region, az
        self.iam_required = iam_required
        self.with_guest = with_guest
        self.guest_systemd = guest_systemd
        self.tag = procs.new_tag()
        self.access_points: List[AccessPoint] = []
        self._started: List[object] = []  # everything with stop(), in start order
        self.seeded: Optional[SeededFs] = None
        self.guest: Optional[Guest] = None

    # ---- what tests use -------------------------------------------------------------

    @property
    def fs_id(self) -> str:
        assert self.seeded is not None, "bed not started"
        return self.seeded.fs_id

    @property
    def dns_name(self) -> str:
        return f"{self.fs_id}.efs.{self.region}.amazonaws.com"

    @property
    def export_dir(self) -> Path:
        return self.workdir / "exports" / "fs"

    def access_point(self, root: str) -> AccessPoint:
        return next(ap for ap in self.access_points if ap.root == root)

    def run(self, argv: Sequence[str], *, timeout: float = 60, env: Optional[Mapping[str, str]] = None,
            input: Optional[bytes] = None, check: bool = False) -> GuestResult:
        assert self.guest is not None, "bed started without a guest"
        return self.guest.run(list(argv), timeout=timeout, env=env, input=input, check=check)

    def mount_efs(self, mountpoint: str, options: str, *, device: Optional[str] = None,
                  env: Optional[Mapping[str, str]] = None, timeout: float = 60) -> GuestResult:
        """`mount -t efs` in the guest, typed as an operator would."""
        self.run(["mkdir", "-p", mountpoint])
        argv = ["mount", "-t", "efs", device or self.fs_id, mountpoint]
        if options:
            argv += ["-o", options]
        return self.run(argv, env=env, timeout=timeout)

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> "Bed":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        self.moto = self._keep(MotoServer(self.workdir / "moto", tag=self.tag).start())
        self.seeded = seed_file_system(self.moto.endpoint_url, self.region, self.az)
        self.ca = BedCA.create(self.workdir / "ca")
        self.credentials = BedCredentials(self.workdir / "credentials.json")
        routes = self._start_exports()
        self.nfs_port = routes[None]  # the root export, reached directly at NFS_IP in the guest
        self.endpoint = self._keep(EfsEndpoint(
            self.workdir / "endpoint", fs_id=self.fs_id, region=self.region, ca=self.ca, routes=routes,
            credentials=self.credentials, iam_required=self.iam_required, tag=self.tag,
            # Access points a test creates in moto at run time are served too, as EFS would.
            moto_url=self.moto.endpoint_url, root_export_dir=self.export_dir,
            dynamic_workdir=self.workdir / "ganesha" / "runtime-access-points",
        ).start())
        self.imds = self._keep(InstanceMetadata(
            self.region, self.az, self.seeded.availability_zone_id, self.credentials).start())
        self.task_credentials = self._keep(TaskCredentials(self.credentials).start())
        self.sts = self._keep(WebIdentitySts(self.credentials).start())  # the guest: http://10.0.2.2:<port>
        if self.with_guest:
            self._start_guest()

    def _start_exports(self) -> Dict[Optional[str], int]:
        """One ganesha per export: the file system root and each access point's root."""
        roots = {None: self.export_dir}
        for moto_id, root in self.seeded.access_point_roots.items():
            ap = AccessPoint("fsap-" + secrets.token_hex(9)[:17], root, self.export_dir / root.lstrip("/"))
            self.access_points.append(ap)
            roots[ap.id] = ap.export_dir
        routes: Dict[Optional[str], int] = {}
        for ap_id, export in roots.items():
            export.mkdir(parents=True, exist_ok=True)
            name = ap_id or "root"
            routes[ap_id] = self._keep(Ganesha(self.workdir / "ganesha" / name, export, tag=self.tag).start()).port
        return routes

    def _start_guest(self) -> None:
        mt_ip = self.seeded.mount_target_ip
        self.guest = self._keep(Guest(
            self.workdir / "guest",
            tag=self.tag,
            forwards=[
                Forward(mt_ip, 2049, self.endpoint.port),
                Forward(MT_IPV6, 2049, self.endpoint.port),
                Forward(NFS_IP, 2049, self.nfs_port),
                Forward(IMDS_IP, 80, self.imds.port),
                Forward(ECS_IP, 80, self.task_credentials.port),
                Forward(EFS_API_IP, 80, self.moto.port),
            ],
            # ipv6only.<name>: a name with only an AAAA record, as an IPv6-only target's has.
            hosts={self.dns_name: mt_ip, f"{self.az}.{self.dns_name}": mt_ip, f"ipv6only.{self.dns_name}": MT_IPV6},
            shares={str(self.workdir): self.workdir},  # the bed's files (CA bundle), even under /tmp
            sbin={"mount.efs": str(MOUNT_EFS)},
            systemd=self.guest_systemd,
        ))
        self.guest.start()
        self.write_guest_config(f"[mount]\nstunnel_cafile = {self.ca.cert_path}\n")

    def efs_api_env(self) -> Dict[str, str]:
        """What points botocore in the guest at the bed's EFS API (its standard variable)."""
        return {"AWS_ENDPOINT_URL_EFS": f"http://{EFS_API_IP}"}

    def write_guest_config(self, text: str) -> None:
        """Replace the guest's /etc/amazon/efs/efs-utils.conf."""
        self.run(["mkdir", "-p", "/etc/amazon/efs"])
        self.run(["tee", "/etc/amazon/efs/efs-utils.conf"], input=text.encode(), check=True)

    def _keep(self, service):
        self._started.append(service)
        return service

    def stop(self) -> None:
        """Stop everything started, newest first; each stop runs even if another fails."""
        errors = []
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception as exc:  # keep stopping the rest; report at the end
                errors.append(f"{type(service).__name__}: {exc}")
        left = procs.tagged_processes(self.tag)
        for p in left:
            p.kill()
        if errors or left:
            raise RuntimeError(f"bed stop: {errors} leftover pids {[p.pid for p in left]}")

    def __enter__(self) -> "Bed":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
