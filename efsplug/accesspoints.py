"""EFS access points for volumes: create (or adopt), wait until available, delete.

The I/O edge of efsplug.agent.provisioning, through botocore with the host's credentials
chain (the configured profile, else the instance role through IMDSv2). Every call is
bounded over its whole run; every failure EFS reports is one line naming the cause and
the fix. Creating is idempotent twice over: an access point tagged with the volume's name
is adopted rather than made again (a retried Create, an agent killed between the API call
and its state write), and the request carries a client token derived from the volume.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from efsplug.agent.provisioning import AccessPointRequest, volume_of
from efsplug.bounded import within
from efsplug.errors import MountFailure, shown

CALL_DEADLINE = 20.0  # one API call, retries included
AVAILABLE_WAIT = 60.0  # creating -> available; EFS takes seconds
_MAX_PAGES = 100  # 100 pages of 100: past EFS's limit of 1,000 access points per file system
_FIXES = {
    "FileSystemNotFound": "file system {fs} does not exist in region {region}; check device= and the region",
    "AccessPointLimitExceeded": "file system {fs} has as many access points as EFS allows; delete unused ones "
                                "(docker volume rm, or the EFS console)",
    "IncorrectFileSystemLifeCycleState": "file system {fs} is not available (being created or deleted); retry "
                                         "once it is",
    "ThrottlingException": "EFS throttled the request; retry in a moment",
}


class AccessPointError(MountFailure):
    """An access point could not be made, found or deleted; the message says why and what to do."""


class AccessPoints:
    """The access points of one region, as the agent sees them."""

    def __init__(self, region: str, *, endpoint_url: Optional[str] = None, profile: Optional[str] = None,
                 call_deadline: float = CALL_DEADLINE) -> None:
        import botocore.config
        import botocore.session

        self.region, self.call_deadline = region, call_deadline
        session = botocore.session.Session(profile=profile) if profile else botocore.session.get_session()
        config = botocore.config.Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
        self._client = session.create_client("efs", region_name=region, endpoint_url=endpoint_url, config=config)

    def list(self, fs_id: str) -> List[Dict[str, Any]]:
        """Every access point of fs_id (all pages)."""
        return list(self._pages(fs_id))

    def find_for_volume(self, fs_id: str, volume: str) -> Optional[Dict[str, Any]]:
        return next((ap for ap in self._pages(fs_id) if volume_of(ap) == volume), None)

    def create(self, request: AccessPointRequest, *, wait: float = AVAILABLE_WAIT,
               clock: Callable[[], float] = time.monotonic) -> str:
        """The access point for request's volume, made if there is none; returned once available."""
        found = self.find_for_volume(request.fs_id, request.volume)
        if found is None:
            found = self._call("CreateAccessPoint", request.fs_id,
                               lambda: self._client.create_access_point(**request.api_arguments()))
        ap_id = str(found["AccessPointId"])
        return self._wait_available(request.fs_id, ap_id, found.get("LifeCycleState"), wait, clock)

    def delete(self, fs_id: str, ap_id: str) -> None:
        """Delete ap_id; one already gone is fine (a retried Remove)."""
        import botocore.exceptions

        try:
            within(self.call_deadline, lambda: self._client.delete_access_point(AccessPointId=ap_id))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) != "AccessPointNotFound":
                raise self._error("DeleteAccessPoint", fs_id, exc) from None
        except (TimeoutError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error("DeleteAccessPoint", fs_id, exc) from None

    def describe(self, fs_id: str, ap_id: str) -> Optional[Dict[str, Any]]:
        """ap_id as EFS describes it; None if it is gone."""
        import botocore.exceptions

        try:
            described = within(self.call_deadline, lambda: self._client.describe_access_points(AccessPointId=ap_id))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "AccessPointNotFound":
                return None
            raise self._error("DescribeAccessPoints", fs_id, exc) from None
        except (TimeoutError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error("DescribeAccessPoints", fs_id, exc) from None
        points = described.get("AccessPoints") or []
        return points[0] if points else None

    def _wait_available(self, fs_id: str, ap_id: str, state: Any, wait: float, clock: Callable[[], float]) -> str:
        deadline = clock() + wait
        delay = 0.2
        while state != "available":
            if state in ("deleting", "deleted", "error"):
                raise AccessPointError(f"access point {ap_id} of {fs_id} is {state}; delete the volume and create "
                                       "it again")
            if clock() >= deadline:
                raise AccessPointError(f"access point {ap_id} of {fs_id} was not available within {wait:g}s "
                                       f"(still {shown(state)}); retry the volume create")
            time.sleep(min(delay, max(deadline - clock(), 0)))  # EFS gives no event: poll, backing off
            delay = min(delay * 2, 5.0)
            described = self.describe(fs_id, ap_id)
            state = described.get("LifeCycleState") if described is not None else "deleted"
        return ap_id

    def _pages(self, fs_id: str) -> Iterator[Dict[str, Any]]:
        token: Optional[str] = None
        for _ in range(_MAX_PAGES):
            kwargs: Dict[str, Any] = {"FileSystemId": fs_id, "MaxResults": 100}
            if token:
                kwargs["NextToken"] = token
            page = self._call("DescribeAccessPoints", fs_id, lambda: self._client.describe_access_points(**kwargs))
            yield from page.get("AccessPoints") or []
            token = page.get("NextToken")
            if not token:
                return

    def _call(self, action: str, fs_id: str, call: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        import botocore.exceptions

        try:
            return within(self.call_deadline, call)
        except (TimeoutError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._error(action, fs_id, exc) from None

    def _error(self, action: str, fs_id: str, exc: BaseException) -> AccessPointError:
        import botocore.exceptions

        if isinstance(exc, TimeoutError):
            return AccessPointError(f"EFS did not answer {action} for {fs_id} within {self.call_deadline:g}s; check the "
                                    "network path to the EFS API and retry")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return AccessPointError(f"{action} for {fs_id} needs AWS credentials; attach an instance role or "
                                    "configure a profile for the agent")
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedOperation"):
                return AccessPointError(f"denied by IAM: elasticfilesystem:{action} on {fs_id}; allow it for the "
                                        "instance role (or the agent's profile)")
            fix = _FIXES.get(code)
            if fix:
                return AccessPointError(f"{action} failed ({code}): " + fix.format(fs=fs_id, region=self.region))
            return AccessPointError(f"{action} for {fs_id} failed ({shown(code)}); see the agent's log and retry")
        return AccessPointError(f"the EFS API is unreachable for {action} ({type(exc).__name__}); check the "
                                "network path and retry")


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", "error"))
