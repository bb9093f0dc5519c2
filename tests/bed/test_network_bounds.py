"""Every network call a mount makes is bounded, against real sockets that misbehave.

A silent or trickling endpoint (IMDS, the ECS credentials endpoint, the EFS API) must not
hold a mount, and in the agent a volume's lock, past the budget the product promises; the
bounds asserted here are those budgets with room to spare, not performance targets.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Type

import pytest

from efsbed.faulty import HugeAnswer, SilentServer, TrickleServer
from efsplug.credentials import CredentialSource, CredentialsUnavailable, fetch_credentials
from efsplug.errors import MountFailure
from efsplug.imds import InstanceMetadata, MetadataUnavailable
from efsplug.resolve import _mount_target_from_api

# The product's timeouts, scaled down (the bound, not its size, is what is tested): per
# request for IMDS (2 attempts, token then document), credentials, and the EFS API.
TIMEOUT = 0.5
IMDS_BUDGET = 2 * TIMEOUT * 2
CREDENTIALS_BUDGET = TIMEOUT
API_BUDGET = 2 * (TIMEOUT + TIMEOUT)
SLACK = 4.0


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    import efsplug.credentials
    import efsplug.resolve

    monkeypatch.setattr(efsplug.credentials, "TIMEOUT_SECONDS", TIMEOUT)
    monkeypatch.setattr(efsplug.resolve, "API_CONNECT_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(efsplug.resolve, "API_READ_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(efsplug.resolve, "API_DEADLINE", API_BUDGET)


def within(budget: float, call: Callable[[], object], error: Type[BaseException]) -> BaseException:
    started = time.monotonic()
    with pytest.raises(error) as caught:
        call()
    took = time.monotonic() - started
    assert took < budget + SLACK, f"{took:.1f}s, over the {budget:g}s budget"
    return caught.value


@pytest.fixture(params=[SilentServer, TrickleServer], ids=["silent", "trickling"])
def stalled(request: pytest.FixtureRequest) -> Iterator[str]:
    with request.param() as server:
        yield server.url


def test_instance_metadata(stalled: str) -> None:
    err = within(IMDS_BUDGET, InstanceMetadata(endpoint=stalled, timeout=TIMEOUT).region, MetadataUnavailable)
    assert "did not answer" in str(err)


def test_task_credentials_endpoint(stalled: str) -> None:
    source = CredentialSource("container", stalled + "/v2/credentials/x")
    err = within(CREDENTIALS_BUDGET, lambda: fetch_credentials(source, environ={}), CredentialsUnavailable)
    assert "did not answer" in str(err) and "/v2/credentials/x" not in str(err)


def test_describe_mount_targets(stalled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EFS", stalled)
    for name, value in (("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"), ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI"),
                        ("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_CONFIG_FILE", "/dev/null"),
                        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")):
        monkeypatch.setenv(name, value)
    call = lambda: _mount_target_from_api("fs-12345678", "us-east-1", None, "fs-12345678.efs.example")  # noqa: E731
    err = within(API_BUDGET, call, MountFailure)
    assert "EFS API is unreachable" in str(err) or "EFS API did not answer" in str(err)


def test_an_endless_answer_is_cut_at_the_size_bound() -> None:
    with HugeAnswer() as server:
        err = within(IMDS_BUDGET, InstanceMetadata(endpoint=server.url, timeout=TIMEOUT).region, MetadataUnavailable)
    assert "longer than" in str(err) or "did not answer" in str(err)
