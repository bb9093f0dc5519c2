"""The EC2 instance metadata service: IMDSv2 (session token) first, v1 as fallback.

Only what the mount needs: region, availability zone and its id. The base URL honours
botocore's AWS_EC2_METADATA_SERVICE_ENDPOINT so operators have one knob for both.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_TTL_SECONDS = 21600


class MetadataUnavailable(Exception):
    """IMDS did not answer (not on EC2, hop limit too low for containers, or disabled)."""


@dataclass
class InstanceMetadata:
    endpoint: str = DEFAULT_ENDPOINT
    timeout: float = 1.0
    _token: Optional[str] = field(default=None, repr=False)
    _cache: Dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "InstanceMetadata":
        return cls(endpoint=environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/"))

    def region(self) -> str:
        return self.get("latest/meta-data/placement/region")

    def availability_zone(self) -> str:
        return self.get("latest/meta-data/placement/availability-zone")

    def availability_zone_id(self) -> str:
        return self.get("latest/meta-data/placement/availability-zone-id")

    def get(self, path: str) -> str:
        if path not in self._cache:
            self._cache[path] = self._fetch(path)
        return self._cache[path]

    def _fetch(self, path: str) -> str:
        token = self._session_token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        request = urllib.request.Request(f"{self.endpoint}/{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read().decode().strip()
        except (urllib.error.URLError, OSError) as exc:
            raise MetadataUnavailable(
                f"instance metadata {self.endpoint}/{path} did not answer ({_reason(exc)}); "
                "on EC2 check that IMDS is enabled and, inside containers, that the hop limit is at least 2"
            ) from None

    def _session_token(self) -> Optional[str]:
        """IMDSv2 token, or None to fall back to v1 when the PUT is not answered."""
        if self._token is None:
            request = urllib.request.Request(
                f"{self.endpoint}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    self._token = response.read().decode().strip()
            except (urllib.error.URLError, OSError):
                self._token = ""
        return self._token or None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc)
