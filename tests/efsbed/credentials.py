"""The bed's registry of the AWS credentials it has issued (its stand-in for IAM/STS).

The registry lives in one JSON file, replaced atomically on every change, so the endpoint
subprocess can read it at any time and re-read it only when the file changed. The file
holds secrets: it is created mode 0600 and never logged.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import string
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Tuple

from efsplug.sigv4 import AwsCredentials

_KEY_ALPHABET = string.ascii_uppercase + "234567"


@dataclass(frozen=True)
class IssuedCredentials:
    label: str
    credentials: AwsCredentials
    revoked: bool = False


def _new_key_id(temporary: bool) -> str:
    # Same shape as AWS: AKIA (long-term) / ASIA (temporary) + 16 base32-ish characters.
    prefix = "ASIA" if temporary else "AKIA"
    return prefix + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16))


def _new_secret() -> str:
    return base64.b64encode(secrets.token_bytes(30)).decode("ascii")  # 40 characters


def _new_session_token() -> str:
    # Real tokens are long base64 with '+', '/' and '=': the signer must URL-quote them.
    return base64.b64encode(secrets.token_bytes(240)).decode("ascii")


def _iso(when: Optional[datetime]) -> Optional[str]:
    return when.astimezone(timezone.utc).isoformat() if when else None


def _from_iso(text: Optional[str]) -> Optional[datetime]:
    return datetime.fromisoformat(text) if text else None


def _encode(issued: IssuedCredentials) -> dict:
    c = issued.credentials
    return {
        "label": issued.label,
        "access_key_id": c.access_key_id,
        "secret_access_key": c.secret_access_key,
        "session_token": c.session_token,
        "expiry": _iso(c.expiry),
        "revoked": issued.revoked,
    }


def _decode(record: dict) -> IssuedCredentials:
    return IssuedCredentials(
        label=record["label"],
        credentials=AwsCredentials(
            access_key_id=record["access_key_id"],
            secret_access_key=record["secret_access_key"],
            session_token=record.get("session_token"),
            expiry=_from_iso(record.get("expiry")),
        ),
        revoked=bool(record.get("revoked")),
    )


class BedCredentials:
    """Issue and revoke credentials; both the writer (tests) and readers (endpoint) use it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: Dict[str, IssuedCredentials] = {}
        self._stamp: Optional[Tuple[int, int, int, int]] = None
        if path.exists():
            self.refresh()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._save()

    def __repr__(self) -> str:
        return f"BedCredentials({str(self.path)!r}, {len(self._records)} issued)"

    # --- writer side -----------------------------------------------------------

    def issue(
        self, label: str, lifetime: timedelta = timedelta(hours=6), temporary: bool = True
    ) -> AwsCredentials:
        creds = AwsCredentials(
            access_key_id=_new_key_id(temporary),
            secret_access_key=_new_secret(),
            session_token=_new_session_token() if temporary else None,
            expiry=(datetime.now(timezone.utc) + lifetime).replace(microsecond=0),
        )
        with self._lock:
            self._records[creds.access_key_id] = IssuedCredentials(label, creds)
            self._save()
        return creds

    def revoke(self, access_key_id: str) -> None:
        with self._lock:
            issued = self._records.get(access_key_id)
            if issued is None:
                raise KeyError(f"no credentials issued with key id {access_key_id}")
            self._records[access_key_id] = IssuedCredentials(issued.label, issued.credentials, True)
            self._save()

    def _save(self) -> None:
        payload = json.dumps({k: _encode(v) for k, v in self._records.items()}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=str(self.path.parent), prefix=".credentials-")
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600 already
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._stamp = self._file_stamp()

    # --- reader side -----------------------------------------------------------

    def _file_stamp(self) -> Tuple[int, int, int, int]:
        st = os.stat(self.path)
        # The inode changes on every atomic replace; mtime/ctime/size catch the rest.
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read or write; True if it did."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return False
            data = json.loads(self.path.read_text())
            self._records = {k: _decode(v) for k, v in data.items()}
            self._stamp = stamp
            return True

    def active(self) -> Dict[str, AwsCredentials]:
        """Issued and not revoked, by access key id (expiry is the verifier's business)."""
        with self._lock:
            return {k: v.credentials for k, v in self._records.items() if not v.revoked}

    def revoked_ids(self) -> FrozenSet[str]:
        with self._lock:
            return frozenset(k for k, v in self._records.items() if v.revoked)

    def label_of(self, access_key_id: str) -> Optional[str]:
        with self._lock:
            issued = self._records.get(access_key_id)
            return issued.label if issued else None
