"""The emulated EFS mount target: TLS in front, IAM check of the client cert, NFS behind.

Runs as its own process (`python -m efsbed.endpoint <config.json>`) so bulk NFS traffic
does not compete with the test runner for the GIL. `EfsEndpoint` is the host-side handle.
The proxy itself lives in efsbed.tlsproxy.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from efsbed import procs
from efsbed.ca import BedCA
from efsbed.credentials import BedCredentials

# JSON object keys cannot be null: the "no access point" route is stored under "".
NO_ACCESS_POINT = ""


def server_names(fs_id: str, region: str) -> List[str]:
    base = f"{fs_id}.efs.{region}.amazonaws.com"
    return [base, f"*.{base}"]  # the wildcard covers the az-prefixed name


@dataclass(frozen=True)
class EndpointConfig:
    port: int
    fs_id: str
    region: str
    cert_path: str
    key_path: str
    credentials_path: str
    events_path: str
    routes: Dict[str, int]  # access point id ("" = none) -> backend port on 127.0.0.1
    iam_required: bool
    generation: int = 0
    # Access points created at run time (efsbed.dynamic_exports); all empty = feature off.
    # Read once at start: a reload does not change them.
    moto_url: str = ""  # where to ask DescribeAccessPoints
    root_export_dir: str = ""  # the file system root on the host; access point roots live under it
    dynamic_workdir: str = ""  # their ganesha configs, logs and recovery dirs

    @property
    def dynamic_access_points(self) -> bool:
        return bool(self.moto_url)

    @classmethod
    def load(cls, path: Path) -> "EndpointConfig":
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(tmp, path)


class EfsEndpoint(procs.Service):
    name = 'EFS endpoint'

    def __init__(
        self,
        workdir: Path,
        *,
        fs_id: str,
        region: str,
        ca: BedCA,
        routes: Mapping[Optional[str], int],
        credentials: BedCredentials,
        iam_required: bool = False,
        tag: str,
        moto_url: str = "",
        root_export_dir: Optional[Path] = None,
        dynamic_workdir: Optional[Path] = None,
    ) -> None:
        self.workdir = workdir
        self.fs_id = fs_id
        self.region = region
        self.tag = tag
        self._ca = ca
        self._credentials = credentials
        self._routes = {(k or NO_ACCESS_POINT): v for k, v in routes.items()}
        self._iam_required = iam_required
        if moto_url and root_export_dir is None:
            raise ValueError("access points from moto need root_export_dir (where their roots live)")
        self._moto_url = moto_url
        self._root_export_dir = root_export_dir
        self._dynamic_workdir = dynamic_workdir or workdir / "access-points"
        self._config: Optional[EndpointConfig] = None
        self.config_path = workdir / "endpoint.json"
        self.events_path = workdir / "events.jsonl"
        self.log_path = workdir / "endpoint.log"

    def __repr__(self) -> str:
        return f"EfsEndpoint({self.fs_id}, port={self._port})"

    @property
    def routes(self) -> Dict[Optional[str], int]:
        """Access point id (None: the file system root) -> its NFS server's port, as reconfigure takes them."""
        return {(k or None): v for k, v in self._routes.items()}

    @property
    def pid(self) -> int:
        """The endpoint process (the leader of its process group)."""
        if self._process is None:
            raise RuntimeError("endpoint not started")
        return self._process.pid

    @property
    def dns_name(self) -> str:
        return server_names(self.fs_id, self.region)[0]

    def _reserve_port(self) -> int:
        self._port = procs.free_port()
        return self._port

    def start(self) -> "EfsEndpoint":
        self.workdir.mkdir(parents=True, exist_ok=True)
        server = self._ca.issue_server(server_names(self.fs_id, self.region), self.workdir / "tls")
        self.events_path.touch()
        self._config = EndpointConfig(
            port=self._reserve_port(),
            fs_id=self.fs_id,
            region=self.region,
            cert_path=str(server.cert_path),
            key_path=str(server.key_path),
            credentials_path=str(self._credentials.path),
            events_path=str(self.events_path),
            routes=dict(self._routes),
            iam_required=self._iam_required,
            moto_url=self._moto_url,
            root_export_dir=str(self._root_export_dir.resolve()) if self._moto_url and self._root_export_dir else "",
            dynamic_workdir=str(self._dynamic_workdir) if self._moto_url else "",
        )
        self._config.save(self.config_path)
        env = dict(os.environ)
        tests_dir = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH")) if p)
        self._process = procs.start(
            f"efs-endpoint-{self.fs_id}",
            [sys.executable, "-m", "efsbed.endpoint", str(self.config_path)],
            tag=self.tag, log=self.log_path, env=env,
        )
        try:
            self._wait_for_event(lambda e: e.get("event") == "listening", timeout=20.0)
        except BaseException:
            self.stop()
            raise
        return self

    def events(self) -> List[dict]:
        if not self.events_path.exists():
            return []
        text = self.events_path.read_text()
        # A line still being appended has no newline yet: leave it for the next read.
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def connection_events(self) -> List[dict]:
        return [e for e in self.events() if e.get("event") in ("accepted", "refused")]

    def wait_for_events(self, count: int, timeout: float = 10.0) -> List[dict]:
        """Wait until at least count connection events were written."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            found = self.connection_events()
            if len(found) >= count or time.monotonic() >= deadline:
                return found
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def reconfigure(
        self,
        *,
        iam_required: Optional[bool] = None,
        routes: Optional[Mapping[Optional[str], int]] = None,
        timeout: float = 10.0,
    ) -> None:
        """Change settings of the running endpoint (SIGHUP) and wait until it took them."""
        if self._config is None or self._process is None:
            raise RuntimeError("endpoint not started")
        changes: dict = {"generation": self._config.generation + 1}
        if iam_required is not None:
            changes["iam_required"] = iam_required
            self._iam_required = iam_required
        if routes is not None:
            self._routes = {(k or NO_ACCESS_POINT): v for k, v in routes.items()}
            changes["routes"] = dict(self._routes)
        self._config = EndpointConfig(**{**self._config.__dict__, **changes})
        self._config.save(self.config_path)
        os.kill(self._process.pid, signal.SIGHUP)
        generation = self._config.generation
        self._wait_for_event(
            lambda e: e.get("event") == "reloaded" and e.get("generation") == generation,
            timeout=timeout,
        )

    def _wait_for_event(self, match: Callable[[dict], bool], timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not any(match(e) for e in self.events()):
            if not self._process.alive():
                raise RuntimeError(f"endpoint exited:\n{self._process.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"endpoint did not report in {timeout}s:\n{self._process.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def main(argv: List[str]) -> int:
    from efsbed.tlsproxy import serve  # the pyOpenSSL side is only needed in the subprocess

    if len(argv) != 1:
        print("usage: python -m efsbed.endpoint <config.json>", file=sys.stderr)
        return 2
    return serve(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
