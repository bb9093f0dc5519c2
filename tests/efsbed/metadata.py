"""Stand-ins for the EC2 instance metadata service and the ECS task credentials endpoint.

Both are small threaded HTTP servers on 127.0.0.1; the kernel guest reaches them through
its relay from 169.254.169.254:80 and 169.254.170.2:80. Responses carry secrets; nothing here
logs request or response bodies.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional, Tuple

from efsbed.credentials import BedCredentials
from efsplug.sigv4 import AwsCredentials

Reply = Tuple[int, str, str]  # status, content type, body

MAX_BODY = 64 * 1024  # request bodies are small forms; a bigger one is cut, not buffered
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


def _iso_z(when: Optional[datetime]) -> str:
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(status: int, payload: object) -> Reply:
    return status, "application/json", json.dumps(payload, indent=2)


def _text(status: int, body: str) -> Reply:
    return status, "text/plain", body


class _LoopbackHttpService:
    """A ThreadingHTTPServer whose handler delegates to self.respond(method, path, headers, body)."""

    def __init__(self) -> None:
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("service not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, path: Optional[str] = None) -> int:
        """How many requests arrived (for one path, or in total)."""
        with self._lock:
            return self._counts[path] if path is not None else sum(self._counts.values())

    def respond(self, method: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Reply:
        raise NotImplementedError

    def start(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request_body = self.rfile.read(min(length, MAX_BODY)) if length else b""
                if length > MAX_BODY:
                    self.close_connection = True  # the rest is never read
                path = self.path.split("?", 1)[0]
                with service._lock:
                    service._counts[path] += 1
                status, ctype, body = service.respond(
                    self.command, path, {k.lower(): v for k, v in self.headers.items()}, request_body
                )
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = _serve

            def log_message(self, format: str, *args: object) -> None:
                pass  # request lines are harmless, but keep test output quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval keeps stop() quick; shutdown() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=type(self).__name__, daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InstanceMetadata(_LoopbackHttpService):
    """IMDS: v2 tokens, optional v1, placement, identity document, instance role credentials."""

    def __init__(
        self,
        region: str,
        az: str,
        az_id: str,
        credentials: BedCredentials,
        role: str = "efsbed-instance-role",
        allow_v1: bool = True,
    ) -> None:
        super().__init__()
        self.region, self.az, self.az_id, self.role = region, az, az_id, role
        self.allow_v1 = allow_v1
        self._bed_credentials = credentials
        self._tokens: Dict[str, None] = {}
        self._role_credentials: Optional[AwsCredentials] = None

    def __repr__(self) -> str:
        return f"InstanceMetadata({self.region}, {self.az}, port={self._server and self.port})"

    @property
    def role_credentials(self) -> AwsCredentials:
        """The instance role's current credentials (issued on first use)."""
        with self._lock:
            if self._role_credentials is None:
                self._role_credentials = self._bed_credentials.issue(f"instance-role:{self.role}")
            return self._role_credentials

    def rotate_role_credentials(self) -> AwsCredentials:
        with self._lock:
            self._role_credentials = None
        return self.role_credentials

    def _documents(self) -> Dict[str, Callable[[], Reply]]:
        md = "/latest/meta-data"
        identity = {
            "region": self.region, "availabilityZone": self.az, "instanceId": "i-0efsbed000000000",
            "instanceType": "t3.micro", "accountId": "123456789012", "architecture": "x86_64",
        }
        return {
            f"{md}/placement/region": lambda: _text(200, self.region),
            f"{md}/placement/availability-zone": lambda: _text(200, self.az),
            f"{md}/placement/availability-zone-id": lambda: _text(200, self.az_id),
            "/latest/dynamic/instance-identity/document": lambda: _json(200, identity),
            f"{md}/iam/security-credentials/": lambda: _text(200, self.role),
            f"{md}/iam/security-credentials": lambda: _text(200, self.role),
            f"{md}/iam/security-credentials/{self.role}": self._role_document,
        }

    def _role_document(self) -> Reply:
        c = self.role_credentials
        return _json(200, {
            "Code": "Success", "LastUpdated": _iso_z(None), "Type": "AWS-HMAC",
            "AccessKeyId": c.access_key_id, "SecretAccessKey": c.secret_access_key,
            "Token": c.session_token, "Expiration": _iso_z(c.expiry),
        })

    def respond(self, method: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Reply:
        if path == TOKEN_PATH:
            if method != "PUT":
                return _text(405, "Method Not Allowed")
            ttl = headers.get(TOKEN_TTL_HEADER.lower(), "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return _text(400, "Bad Request")
            token = secrets.token_urlsafe(32)
            with self._lock:
                self._tokens[token] = None
            return _text(200, token)
        if method != "GET":
            return _text(405, "Method Not Allowed")
        token = headers.get(TOKEN_HEADER.lower())
        with self._lock:
            known = token in self._tokens if token is not None else False
        if token is not None and not known:
            return _text(401, "Unauthorized")
        if token is None and not self.allow_v1:
            return _text(401, "Unauthorized")
        doc = self._documents().get(path)
        return doc() if doc else _text(404, "Not Found")


class TaskCredentials(_LoopbackHttpService):
    """The ECS agent's credentials endpoint: /v2/credentials/<id> until the task stops."""

    def __init__(self, credentials: BedCredentials) -> None:
        super().__init__()
        self._bed_credentials = credentials
        self._grants: Dict[str, AwsCredentials] = {}

    def __repr__(self) -> str:
        return f"TaskCredentials({len(self._grants)} granted, port={self._server and self.port})"

    @staticmethod
    def path_of(rel_id: str) -> str:
        return f"/v2/credentials/{rel_id}"

    def grant(self, rel_id: str) -> AwsCredentials:
        creds = self._bed_credentials.issue(f"task:{rel_id}")
        with self._lock:
            self._grants[rel_id] = creds
        return creds

    def rotate(self, rel_id: str) -> AwsCredentials:
        """Fresh credentials for a live grant; the old ones stay valid until they expire."""
        with self._lock:
            if rel_id not in self._grants:
                raise KeyError(f"no credentials granted for {rel_id}")
        return self.grant(rel_id)

    def revoke(self, rel_id: str) -> None:
        """The task stopped: the URI answers an error and its credentials stop working."""
        with self._lock:
            creds = self._grants.pop(rel_id)
        self._bed_credentials.revoke(creds.access_key_id)

    def requests(self, rel_id: Optional[str] = None) -> int:  # type: ignore[override]
        return super().requests(self.path_of(rel_id) if rel_id is not None else None)

    def respond(self, method: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Reply:
        prefix = "/v2/credentials/"
        if method != "GET" or not path.startswith(prefix):
            return _json(404, {"code": "NotFound", "message": "Not found"})
        rel_id = path[len(prefix):]
        with self._lock:
            creds = self._grants.get(rel_id)
        if creds is None:
            # Shape of the agent's answer for an unknown or stopped task's credentials id.
            return _json(400, {
                "code": "InvalidIdInRequest",
                "message": "CredentialsV2Request: Credentials not found",
                "HTTPErrorCode": 400,
            })
        return _json(200, {
            "AccessKeyId": creds.access_key_id,
            "SecretAccessKey": creds.secret_access_key,
            "Token": creds.session_token,
            "Expiration": _iso_z(creds.expiry),
            "RoleArn": f"arn:aws:iam::123456789012:role/efsbed-task-{rel_id}",
        })
