"""Certificate renewal: fresh credentials from the recorded source, a new certificate, SIGHUP.

stunnel re-reads its certificate on SIGHUP and keeps open connections, so the mount is
never dropped; the next TLS connection presents the new certificate. The file is
replaced atomically: a reload never reads half a certificate.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Mapping, Optional

from efsplug import certificate
from efsplug.config import Config
from efsplug.credentials import CredentialSource, CredentialsUnavailable, fetch_credentials
from efsplug.fsutil import atomic_write
from efsplug.state import MountRecord
from efsplug.tunnel import Tunnel
from efsplug.unmount import tunnel_dir

KEY_FILE = "privateKey.pem"  # the key mount.efs created (efsplug.mounttunnel.KEY_FILE)
CERT_FILE = "certificate.pem"


class RenewalError(RuntimeError):
    """The certificate could not be renewed; `revoked` when the credential source is gone."""

    def __init__(self, message: str, *, revoked: bool = False) -> None:
        super().__init__(message)
        self.revoked = revoked


@dataclass(frozen=True)
class Renewed:
    cert_not_before: datetime
    cert_not_after: datetime
    credential_expiry: Optional[datetime]
    serial: int
    reloaded: bool  # False: no tunnel was running to reload (the next start reads the file)


def renew_certificate(
    record: MountRecord, *, state_dir: Path, config: Config, now: datetime, environ: Mapping[str, str] = os.environ,
) -> Renewed:
    """Write a new certificate for record and reload its tunnel. RenewalError on failure."""
    if record.region is None:
        raise RenewalError(f"the record of {record.mountpoint} has no region")
    credentials = None
    if record.iam:
        if not record.credential_source:
            raise RenewalError(f"the record of {record.mountpoint} does not say where its credentials came from")
        try:
            source = CredentialSource.parse(record.credential_source)
            credentials = fetch_credentials(source, environ=environ, region=record.region)
        except ValueError as exc:
            raise RenewalError(str(exc)) from None
        except CredentialsUnavailable as exc:
            raise RenewalError(str(exc), revoked=True) from None
    key = certificate.load_or_create_private_key(Path(state_dir) / KEY_FILE)
    request = certificate.certificate_request(
        fs_id=record.fs_id, region=record.region, hostname=socket.gethostname(), now=now,
        access_point=record.access_point, credentials=credentials,
        lifetime=timedelta(minutes=config.efsplug.cert_lifetime_min), client_source=config.client_info.source,
    )
    cert = certificate.build_certificate(key, request)
    target = tunnel_dir(record, state_dir) / CERT_FILE  # shared with mounts that joined it
    if not target.parent.is_dir():
        raise RenewalError(f"{target.parent} is gone; the mount is being removed")
    atomic_write(target, certificate.certificate_pem(cert), 0o600)
    tunnel = Tunnel.from_identity(record.tunnel) if record.tunnel else None
    if tunnel is not None:
        tunnel.reload()
    return Renewed(
        cert_not_before=request.not_before, cert_not_after=request.not_after,
        credential_expiry=credentials.expiry if credentials else None, serial=cert.serial_number,
        reloaded=tunnel is not None,
    )
