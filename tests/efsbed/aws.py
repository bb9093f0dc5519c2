"""The AWS APIs the product calls (EFS, EC2), served locally by moto in server mode.

moto invents the ids; the bed then uses moto's file system id everywhere (endpoint
certificate, DNS names, mounts) so DescribeMountTargets and the data path agree.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import botocore.session
from botocore.config import Config

from efsbed import procs

# moto accepts any credentials; these only keep botocore from looking for real ones.
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAEFSBEDDUMMY00000",
    "AWS_SECRET_ACCESS_KEY": "efsbed-dummy-secret",
}


@dataclass(frozen=True)
class SeededFs:
    fs_id: str
    mount_target_id: str
    mount_target_ip: str
    subnet_id: str
    availability_zone: str
    availability_zone_id: str  # moto's own mapping (us-east-1a -> use1-az6): give it to IMDS
    access_points: List[str] = field(default_factory=list)
    access_point_roots: Dict[str, str] = field(default_factory=dict)  # id -> root directory


class MotoServer(procs.Service):
    name = 'moto'

    def __init__(self, workdir: Path, *, tag: str) -> None:
        self.workdir = workdir
        self.tag = tag

    def __repr__(self) -> str:
        return f"MotoServer(port={self._port})"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._port = procs.free_port()
        env = {**os.environ, **DUMMY_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self._process = procs.start(  # moto's server, with EFS's access point behaviour (moto_efs)
            "moto", [sys.executable, "-m", "efsbed.moto_efs", "-H", "127.0.0.1", "-p", str(self._port)],
            tag=self.tag, log=self.workdir / "moto.log", env=env,
        )
        try:
            procs.wait_for_port(self._port, timeout=60.0, process=self._process)
        except BaseException:
            self.stop()
            raise
        return self


def client(service: str, endpoint_url: str, region: str, config: Optional[Config] = None):
    """A botocore client for moto; config sets timeouts and retries where a caller must not hang."""
    session = botocore.session.get_session()
    return session.create_client(
        service, region_name=region, endpoint_url=endpoint_url,
        aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        config=config,
    )


def seed_file_system(endpoint_url: str, region: str, az: str) -> SeededFs:
    """A file system with one mount target in az and two access points (/ap-a, /ap-b)."""
    ec2 = client("ec2", endpoint_url, region)
    efs = client("efs", endpoint_url, region)
    # TEST-NET-1: the mount target's address may only ever be a relayed address in the guest.
    vpc_id = ec2.create_vpc(CidrBlock="192.0.2.0/24")["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="192.0.2.0/25", AvailabilityZone=az)["Subnet"]["SubnetId"]
    fs_id = efs.create_file_system(CreationToken="efsbed-" + os.urandom(4).hex(), Encrypted=True)["FileSystemId"]
    target = efs.create_mount_target(FileSystemId=fs_id, SubnetId=subnet_id)
    roots: Dict[str, str] = {}
    for root in ("/ap-a", "/ap-b"):
        ap = efs.create_access_point(
            FileSystemId=fs_id,
            PosixUser={"Uid": 1000, "Gid": 1000},
            RootDirectory={
                "Path": root,
                "CreationInfo": {"OwnerUid": 1000, "OwnerGid": 1000, "Permissions": "0755"},
            },
        )
        roots[ap["AccessPointId"]] = root
    return SeededFs(
        fs_id=fs_id,
        mount_target_id=target["MountTargetId"],
        mount_target_ip=target["IpAddress"],
        subnet_id=subnet_id,
        availability_zone=target.get("AvailabilityZoneName", az),
        availability_zone_id=target.get("AvailabilityZoneId", ""),
        access_points=list(roots),
        access_point_roots=roots,
    )
