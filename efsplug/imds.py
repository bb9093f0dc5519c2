"""The EC2 instance metadata service: IMDSv2 (session token) first, v1 as fallback.

What the mount needs: region, availability zone and its id, and the instance role's
credentials. The base URL honours botocore's AWS_EC2_METADATA_SERVICE_ENDPOINT (and
AWS_EC2_METADATA_DISABLED) so operators have one set of knobs for both.

Plain http.client rather than urllib.request or botocore: `mount.efs` is a short-lived
process and those imports cost more than the requests themselves (about 0.15 s and
0.8 s under the test bed's user-mode kernel).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from efsplug.sigv4 import AwsCredentials

if TYPE_CHECKING:
    import http.client

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_TTL_SECONDS = 21600
# IMDS answers in milliseconds, but a loaded host (20 mounts starting at once) can take
# longer than botocore's 1 s to get to it: allow 2 s, and one more try after a timeout.
TIMEOUT_SECONDS = 2.0
ATTEMPTS = 2
ROLE_PATH = "latest/meta-data/iam/security-credentials/"


class MetadataUnavailable(Exception):
    """IMDS did not answer (not on EC2, hop limit too low for containers, or disabled)."""


@dataclass
class InstanceMetadata:
    endpoint: str = DEFAULT_ENDPOINT
    timeout: float = TIMEOUT_SECONDS
    attempts: int = ATTEMPTS
    disabled: bool = False
    _token: Optional[str] = field(default=None, repr=False)
    _cache: Dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "InstanceMetadata":
        return cls(
            endpoint=environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/"),
            disabled=environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true",
        )

    def region(self) -> str:
        return self.get("latest/meta-data/placement/region")

    def availability_zone(self) -> str:
        return self.get("latest/meta-data/placement/availability-zone")

    def availability_zone_id(self) -> str:
        return self.get("latest/meta-data/placement/availability-zone-id")

    def role_credentials(self) -> AwsCredentials:
        """The attached role's credentials (never cached: they rotate)."""
        listed = self.get(ROLE_PATH).split()
        role = listed[0] if listed else ""
        if not role:
            raise MetadataUnavailable("instance metadata lists no IAM role; attach an instance profile")
        try:
            return AwsCredentials.from_document(self._fetch(ROLE_PATH + role))
        except ValueError:
            raise MetadataUnavailable(f"instance metadata role {role!r}: answer without AccessKeyId/SecretAccessKey") from None

    def get(self, path: str) -> str:
        if path not in self._cache:
            self._cache[path] = self._fetch(path)
        return self._cache[path]

    def _fetch(self, path: str) -> str:
        if self.disabled:
            raise MetadataUnavailable("instance metadata is disabled (AWS_EC2_METADATA_DISABLED=true)")
        token = self._session_token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        try:
            status, body = self._request("GET", path, headers)
        except OSError as exc:
            raise MetadataUnavailable(self._unanswered(path, str(exc) or type(exc).__name__)) from None
        if status != 200:
            raise MetadataUnavailable(self._unanswered(path, f"HTTP {status}"))
        return body

    def _unanswered(self, path: str, reason: str) -> str:
        return (
            f"instance metadata {self.endpoint}/{path} did not answer ({reason}); on EC2 check that IMDS is "
            "enabled and, inside containers, that the hop limit is at least 2"
        )

    def _session_token(self) -> Optional[str]:
        """IMDSv2 token, or None to fall back to v1 when the PUT is not answered."""
        if self._token is None:
            try:
                status, body = self._request(
                    "PUT", "latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)}
                )
                self._token = body.strip() if status == 200 else ""
            except OSError:
                self._token = ""
        return self._token or None

    def _request(self, method: str, path: str, headers: Mapping[str, str]) -> Tuple[int, str]:
        for attempt in range(1, self.attempts + 1):
            try:
                return http_request(method, f"{self.endpoint}/{path}", headers, self.timeout)
            except (TimeoutError, socket.timeout):
                if attempt == self.attempts:
                    raise
        raise AssertionError("unreachable")


MAX_BODY = 256 * 1024  # metadata and credentials documents are a few KiB


def http_request(method: str, url: str, headers: Mapping[str, str], timeout: float) -> Tuple[int, str]:
    """One HTTP(S) request: (status, body text). OSError for anything on the wire.

    timeout bounds the whole request, not each socket operation: an endpoint that
    trickles a byte now and then would otherwise hold the mount (and, in the agent, the
    volume's lock) for ever. The body is read up to MAX_BODY.
    """
    import http.client  # here: it pulls in ssl, and most mounts never ask IMDS anything

    parts = urlsplit(url)
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout)
    elif parts.scheme == "http":
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    else:
        raise OSError(f"unsupported URL scheme {parts.scheme!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    expired = threading.Event()
    try:
        connection.connect()
        # At the deadline the socket is shut down: whatever read is blocked fails at once.
        timer = threading.Timer(timeout, _cut, args=(connection.sock, expired))
        timer.daemon = True
        timer.start()
        try:
            connection.request(method, target, headers=dict(headers))
            response = connection.getresponse()
            body = response.read(MAX_BODY + 1)
        finally:
            timer.cancel()
        if expired.is_set():  # cut mid-answer: what was parsed is not the whole answer
            raise TimeoutError(f"no complete answer within {timeout:g}s")
        if len(body) > MAX_BODY:
            raise OSError(f"answer longer than {MAX_BODY} bytes")
        return response.status, body.decode(errors="replace")
    except (http.client.HTTPException, OSError) as exc:  # HTTPException: a garbled or cut answer
        if expired.is_set():
            raise TimeoutError(f"no complete answer within {timeout:g}s") from None
        if isinstance(exc, OSError):
            raise
        raise OSError(f"bad HTTP answer ({type(exc).__name__})") from None
    finally:
        connection.close()


def _cut(sock: Optional[socket.socket], expired: threading.Event) -> None:
    expired.set()
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed
