"""Where to connect for a file system: its DNS name, or a mount target IP as fallback.

The fallback asks the EFS API (DescribeMountTargets, through botocore, which honours
AWS_ENDPOINT_URL_EFS) for an available target, preferring the instance's own AZ id, and
checks that NFS port 2049 answers before trusting it: a security group that blocks 2049
is the most common reason a mount hangs, and it deserves its own error.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional

from efsplug.bounded import within
from efsplug.errors import MountFailure

NFS_PORT = 2049
CONNECT_CHECK_SECONDS = 3.0
API_CONNECT_TIMEOUT, API_READ_TIMEOUT, API_ATTEMPTS = 3.0, 5.0, 2  # DescribeMountTargets: bounded, see below
API_DEADLINE = API_ATTEMPTS * (API_CONNECT_TIMEOUT + API_READ_TIMEOUT)


@dataclass(frozen=True)
class MountTarget:
    address: str  # what the tunnel or NFS client connects to: DNS name, IPv4 or IPv6 address
    dns_name: str  # the name the server certificate must carry
    via: str  # dns | mounttargetip | describe-mount-targets


def locate_mount_target(
    *,
    fs_id: str,
    region: str,
    dns_name: str,
    mounttargetip: Optional[str],
    availability_zone_id: Callable[[], Optional[str]],
    fallback_enabled: bool,
    environ: Mapping[str, str] = os.environ,
) -> MountTarget:
    if mounttargetip:
        return MountTarget(mounttargetip, dns_name, "mounttargetip")
    if _resolves(dns_name):
        return MountTarget(dns_name, dns_name, "dns")
    if not fallback_enabled:
        raise MountFailure(
            f"cannot resolve {dns_name}; check that {fs_id} exists in {region}, that the VPC has DNS "
            "resolution enabled, or pass mounttargetip=<ip> (the IP fallback is disabled in efs-utils.conf)"
        )
    target_ip = _mount_target_from_api(fs_id, region, availability_zone_id(), dns_name)
    if not _port_answers(target_ip):
        raise MountFailure(
            f"mount target {target_ip} of {fs_id} does not answer on port {NFS_PORT}; allow inbound TCP "
            f"{NFS_PORT} from this host in the mount target's security group"
        )
    return MountTarget(target_ip, dns_name, "describe-mount-targets")


def _resolves(name: str) -> bool:
    try:
        # Any family: an IPv6-only mount target's name has only an AAAA record (efs-utils 2.3+).
        return bool(socket.getaddrinfo(name, NFS_PORT, socket.AF_UNSPEC, socket.SOCK_STREAM))
    except (socket.gaierror, UnicodeError):
        return False


def _port_answers(ip: str) -> bool:
    try:
        with socket.create_connection((ip, NFS_PORT), timeout=CONNECT_CHECK_SECONDS):
            return True
    except OSError:
        return False


def _mount_target_from_api(fs_id: str, region: str, az_id: Optional[str], dns_name: str) -> str:
    import botocore.config
    import botocore.exceptions
    import botocore.session

    # botocore's defaults (60 s timeouts, 5 attempts) let a silent endpoint hold a mount,
    # and in the agent the volume's lock, for minutes: at most 2 x (3 + 5) s here.
    config = botocore.config.Config(connect_timeout=API_CONNECT_TIMEOUT, read_timeout=API_READ_TIMEOUT,
                                    retries={"max_attempts": API_ATTEMPTS, "mode": "standard"})
    try:
        client = botocore.session.get_session().create_client("efs", region_name=region, config=config)
        targets = within(API_DEADLINE, lambda: client.describe_mount_targets(FileSystemId=fs_id)["MountTargets"])
    except TimeoutError:
        raise MountFailure(f"cannot resolve {dns_name}, and the EFS API did not answer DescribeMountTargets within "
                           f"{API_DEADLINE:g}s; pass mounttargetip=<ip>") from None
    except botocore.exceptions.NoCredentialsError:
        raise MountFailure(
            f"cannot resolve {dns_name}, and the IP fallback needs AWS credentials to call "
            "DescribeMountTargets; attach an instance role or pass mounttargetip=<ip>"
        ) from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise MountFailure(
            f"cannot resolve {dns_name}, and DescribeMountTargets for {fs_id} failed ({code}); "
            f"check the file system id and region {region}"
        ) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise MountFailure(f"cannot resolve {dns_name}, and the EFS API is unreachable ({type(exc).__name__})") from None
    return choose_mount_target(targets, fs_id=fs_id, az_id=az_id, dns_name=dns_name)


def choose_mount_target(targets: List[Mapping[str, str]], *, fs_id: str, az_id: Optional[str], dns_name: str) -> str:
    """The IP of an available target, in the instance's AZ when its id is known (pure)."""
    available = [t for t in targets if t.get("LifeCycleState") == "available"]
    if az_id:
        same_az = [t for t in available if t.get("AvailabilityZoneId") == az_id]
        if not same_az:
            raise MountFailure(
                f"cannot resolve {dns_name}, and {fs_id} has no available mount target in AZ {az_id}; "
                "create one there or pass mounttargetip=<ip> for a target in another AZ"
            )
        available = same_az
    if not available:
        raise MountFailure(
            f"cannot resolve {dns_name}, and {fs_id} has no available mount target; create one in this VPC"
        )
    # A dual-stack target has both; an IPv6-only target has only Ipv6Address (as efs-utils reads it).
    chosen = available[0]
    return chosen.get("IpAddress") or chosen["Ipv6Address"]
