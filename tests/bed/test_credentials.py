"""efsplug.imds and efsplug.credentials against the bed's real metadata services.

On the host the services listen on 127.0.0.1 and are reached through the variables the
product honours: AWS_EC2_METADATA_SERVICE_ENDPOINT for IMDS, AWS_CONTAINER_CREDENTIALS_FULL_URI
for container credentials, AWS_ENDPOINT_URL_STS (moto) for web identity. `awscredsuri`
always goes to the fixed ECS address 169.254.170.2, as in efs-utils: that path is tested in
the guest, where the address is relayed to the bed's endpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from efsbed import procs
from efsbed.aws import MotoServer
from efsbed.credentials import BedCredentials
from efsbed.metadata import TOKEN_PATH, InstanceMetadata as ImdsService, Reply, TaskCredentials, _text
from efsplug.credentials import CredentialSource, CredentialsUnavailable, fetch_credentials, find_credentials
from efsplug.imds import InstanceMetadata, MetadataUnavailable
from efsplug.sigv4 import AwsCredentials

REGION, AZ, AZ_ID = "eu-west-1", "eu-west-1b", "euw1-az2"


class V1OnlyImds(ImdsService):
    """An IMDS that does not hand out v2 tokens (an old service, or a proxy eating PUTs)."""

    def respond(self, method: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Reply:
        if path == TOKEN_PATH:
            return _text(403, "Forbidden")
        return super().respond(method, path, headers, body)


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> BedCredentials:
    return BedCredentials(tmp_path_factory.mktemp("creds") / "credentials.json")


@pytest.fixture(scope="module")
def imds(creds: BedCredentials) -> Iterator[ImdsService]:
    with ImdsService(REGION, AZ, AZ_ID, creds, allow_v1=False) as service:
        yield service


@pytest.fixture(scope="module")
def tasks(creds: BedCredentials) -> Iterator[TaskCredentials]:
    with TaskCredentials(creds) as service:
        yield service


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty HOME: no ~/.aws files unless a test writes them."""
    return tmp_path


def env_for(imds: ImdsService, home: Path, **extra: str) -> Dict[str, str]:
    return {"HOME": str(home), "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url + "/", **extra}


def write_profile(home: Path, name: str, c: AwsCredentials, *, config: bool = False) -> None:
    aws = home / ".aws"
    aws.mkdir(exist_ok=True)
    if config:
        section = "default" if name == "default" else f"profile {name}"
        (aws / "config").write_text(
            f"[{section}]\naws_access_key_id = {c.access_key_id}\naws_secret_access_key = {c.secret_access_key}\n"
        )
    else:
        (aws / "credentials").write_text(
            f"[{name}]\naws_access_key_id = {c.access_key_id}\naws_secret_access_key = {c.secret_access_key}\n"
            f"aws_session_token = {c.session_token}\n"
        )


def assert_no_secret(text: str, *issued: AwsCredentials) -> None:
    for c in issued:
        assert c.secret_access_key not in text
        if c.session_token:
            assert c.session_token not in text


# --- IMDS -------------------------------------------------------------------------------

def test_imds_v2_token_once_then_every_document(imds: ImdsService) -> None:
    before_tokens, before = imds.requests(TOKEN_PATH), imds.requests()
    md = InstanceMetadata(endpoint=imds.url)
    assert (md.region(), md.availability_zone(), md.availability_zone_id()) == (REGION, AZ, AZ_ID)
    assert md.region() == REGION  # cached: no new request
    assert imds.requests(TOKEN_PATH) - before_tokens == 1
    assert imds.requests() - before == 4  # one PUT, three GETs; this service refuses v1


def test_imds_falls_back_to_v1(creds: BedCredentials) -> None:
    with V1OnlyImds(REGION, AZ, AZ_ID, creds, allow_v1=True) as v1:
        md = InstanceMetadata.from_environment({"AWS_EC2_METADATA_SERVICE_ENDPOINT": v1.url + "/"})
        assert md.region() == REGION
        role = md.role_credentials()
        assert role.access_key_id == v1.role_credentials.access_key_id
        assert v1.requests(TOKEN_PATH) == 1  # asked once, refused, not asked again


def test_imds_role_credentials_are_the_roles_current_ones(imds: ImdsService) -> None:
    md = InstanceMetadata.from_environment({"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url})
    first = md.role_credentials()
    expected = imds.role_credentials
    assert first == expected  # key, secret, token and expiry of the role the service lists
    assert imds.requests(f"/latest/meta-data/iam/security-credentials/{imds.role}") >= 1
    rotated = imds.rotate_role_credentials()
    assert md.role_credentials().access_key_id == rotated.access_key_id  # not cached
    assert_no_secret(repr(first), expected)


def test_imds_unreachable_names_the_fix() -> None:
    md = InstanceMetadata(endpoint=f"http://127.0.0.1:{procs.free_port()}", timeout=2.0)
    with pytest.raises(MetadataUnavailable, match="hop limit is at least 2"):
        md.region()


def test_imds_disabled_by_environment(imds: ImdsService) -> None:
    before = imds.requests()
    md = InstanceMetadata.from_environment(
        {"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url, "AWS_EC2_METADATA_DISABLED": "true"})
    with pytest.raises(MetadataUnavailable, match="AWS_EC2_METADATA_DISABLED"):
        md.region()
    assert imds.requests() == before


# --- the chain, in efs-utils' order -------------------------------------------------------

def test_instance_role_when_nothing_else(imds: ImdsService, home: Path) -> None:
    found, source = find_credentials(environ=env_for(imds, home))
    assert str(source) == "instance"
    assert found.access_key_id == imds.role_credentials.access_key_id
    assert found.expiry == imds.role_credentials.expiry


def test_container_credentials_before_instance_role(imds: ImdsService, tasks: TaskCredentials, home: Path) -> None:
    granted = tasks.grant("chain-container")
    uri = tasks.url + tasks.path_of("chain-container")
    found, source = find_credentials(environ=env_for(imds, home, AWS_CONTAINER_CREDENTIALS_FULL_URI=uri))
    assert (source.kind, found.access_key_id, found.session_token) == ("container", granted.access_key_id,
                                                                       granted.session_token)
    assert fetch_credentials(CredentialSource.parse(source.persisted)).access_key_id == granted.access_key_id
    assert uri not in str(source)  # shown, the URI is a tag


@pytest.mark.parametrize("in_config", [False, True], ids=["credentials-file", "config-file"])
def test_profile_before_everything(imds: ImdsService, tasks: TaskCredentials, creds: BedCredentials, home: Path,
                                   in_config: bool) -> None:
    mine = creds.issue("profile-default", temporary=not in_config)
    write_profile(home, "default", mine, config=in_config)
    uri = tasks.url + tasks.path_of("chain-container")
    tasks.grant("chain-container")
    found, source = find_credentials(environ=env_for(imds, home, AWS_CONTAINER_CREDENTIALS_FULL_URI=uri))
    assert (str(source), found.access_key_id, found.secret_access_key) == (
        "profile:default", mine.access_key_id, mine.secret_access_key)


def test_aws_profile_and_awsprofile_pick_the_profile(imds: ImdsService, creds: BedCredentials, home: Path) -> None:
    other = creds.issue("profile-other")
    write_profile(home, "other", other)
    found, source = find_credentials(environ=env_for(imds, home, AWS_PROFILE="other"))
    assert (str(source), found.access_key_id) == ("profile:other", other.access_key_id)
    found, source = find_credentials(awsprofile="other", environ=env_for(imds, home))
    assert (str(source), found.access_key_id) == ("profile:other", other.access_key_id)


def test_named_profile_missing_does_not_fall_back(imds: ImdsService, home: Path) -> None:
    """awsprofile= asks for one identity: mounting with the instance role instead would be wrong."""
    before = imds.requests()
    with pytest.raises(CredentialsUnavailable, match=r"profile 'nope'.*neither .*credentials nor .*config exists"):
        find_credentials(awsprofile="nope", environ=env_for(imds, home))
    assert imds.requests() == before


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto"), tag=procs.new_tag()) as server:
        yield server


def test_web_identity_before_instance_role(imds: ImdsService, moto: MotoServer, home: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's web identity provider reads os.environ itself, so the variables go there."""
    token = home / "token"
    token.write_text("eyJhbGciOi.efsbed.token")
    role = "arn:aws:iam::123456789012:role/efsbed-web"
    for name, value in {"AWS_ROLE_ARN": role, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "HOME": str(home),
                        "AWS_ENDPOINT_URL_STS": moto.endpoint_url, "AWS_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    found, source = find_credentials(environ=env_for(imds, home, AWS_ROLE_ARN=role,
                                                     AWS_WEB_IDENTITY_TOKEN_FILE=str(token)))
    assert (source.kind, source.detail) == ("webidentity", f"{role} {token}")  # the file too: renewal needs it
    assert found.access_key_id and found.session_token
    assert found.access_key_id != imds.role_credentials.access_key_id


def test_rolearn_and_jwtpath_from_options(imds: ImdsService, moto: MotoServer, home: Path) -> None:
    """The rolearn=/jwtpath= pair goes to STS itself (moto here), whatever AWS_ROLE_ARN says."""
    token = home / "jwt"
    token.write_text("eyJhbGciOi.efsbed.option-token\n")
    role = "arn:aws:iam::123456789012:role/efsbed-option"
    env = env_for(imds, home, AWS_ENDPOINT_URL_STS=moto.endpoint_url, AWS_ROLE_ARN="arn:aws:iam::1:role/x")
    found, source = find_credentials(rolearn=role, jwtpath=str(token), region=REGION, environ=env)
    assert (source.kind, source.detail) == ("webidentity", f"{role} {token}")
    assert found.access_key_id and found.session_token and found.expiry is not None
    assert found.access_key_id != imds.role_credentials.access_key_id
    again = fetch_credentials(CredentialSource.parse(str(source)), environ=env, region=REGION)
    assert again.session_token


def test_every_source_tried_in_order_when_none_answers(home: Path) -> None:
    dead = f"http://127.0.0.1:{procs.free_port()}"
    env = {"HOME": str(home), "AWS_EC2_METADATA_SERVICE_ENDPOINT": dead,
           "AWS_CONTAINER_CREDENTIALS_FULL_URI": dead + "/creds",
           "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/r", "AWS_WEB_IDENTITY_TOKEN_FILE": str(home / "none")}
    with pytest.raises(CredentialsUnavailable) as raised:
        find_credentials(environ=env)
    message = str(raised.value)
    order = [message.find(part) for part in ("profile 'default'", "container credentials", "web identity",
                                             "instance role")]
    assert -1 not in order and order == sorted(order), message
    assert "pass awsprofile=<name> or awscredsuri=<path>, or attach an instance role" in message


# --- failures say what to check, and never show a secret ------------------------------------

def test_revoked_container_credentials(tasks: TaskCredentials, home: Path) -> None:
    granted = tasks.grant("stopped-task")
    source = CredentialSource("container", tasks.url + tasks.path_of("stopped-task"))
    assert fetch_credentials(source).access_key_id == granted.access_key_id
    tasks.revoke("stopped-task")
    with pytest.raises(CredentialsUnavailable) as raised:
        fetch_credentials(source)
    assert "answered HTTP 400; the task's credentials are gone (task stopped?) or the URI is wrong" in str(raised.value)
    assert_no_secret(str(raised.value) + repr(source), granted)


def test_container_token_file_is_sent(creds: BedCredentials, home: Path) -> None:
    """The full-URI form authenticates with the token from AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE."""

    class Guarded(TaskCredentials):
        def respond(self, method: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Reply:
            if headers.get("authorization") != "Bearer efsbed":
                return 401, "application/json", "{}"
            return super().respond(method, path, headers, body)

    token = home / "auth-token"
    token.write_text("Bearer efsbed\n")
    with Guarded(creds) as service:
        granted = service.grant("with-token")
        source = CredentialSource("container", service.url + service.path_of("with-token"))
        found = fetch_credentials(source, environ={"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token)})
        assert found.access_key_id == granted.access_key_id
        with pytest.raises(CredentialsUnavailable, match="answered HTTP 401"):
            fetch_credentials(source, environ={})


def test_broken_answers_do_not_leak(creds: BedCredentials, home: Path) -> None:
    leaked = creds.issue("leaky")

    class Leaky(TaskCredentials):
        def respond(self, method: str, path: str, headers: Dict[str, str], body: bytes = b"") -> Reply:
            # A body with secrets but without the key id: the error must not quote it.
            return 200, "application/json", json.dumps({"SecretAccessKey": leaked.secret_access_key,
                                                        "Token": leaked.session_token})

    with Leaky(creds) as service:
        with pytest.raises(CredentialsUnavailable) as raised:
            fetch_credentials(CredentialSource("container", service.url + "/v2/credentials/x"))
    assert "answered without AccessKeyId/SecretAccessKey" in str(raised.value)
    assert_no_secret(str(raised.value), leaked)


def test_broken_profile_file_is_named_not_quoted(imds: ImdsService, creds: BedCredentials, home: Path) -> None:
    c = creds.issue("broken-profile")
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text(f"[default\naws_secret_access_key = {c.secret_access_key}\n")
    with pytest.raises(CredentialsUnavailable) as raised:
        find_credentials(awsprofile="default", environ=env_for(imds, home))
    assert "cannot read" in str(raised.value) and str(home / ".aws" / "credentials") in str(raised.value)
    assert_no_secret(str(raised.value), c)


def test_reprs_hold_no_secret(imds: ImdsService, tasks: TaskCredentials, creds: BedCredentials, home: Path) -> None:
    write_profile(home, "default", creds.issue("repr"))
    found: List[object] = []
    for env in (env_for(imds, home), env_for(imds, home / "empty")):
        c, source = find_credentials(environ=env)
        found += [c, source]
        assert_no_secret(repr(c) + repr(source) + str(source), c)
    role = InstanceMetadata(endpoint=imds.url).role_credentials()
    assert_no_secret(repr(role), imds.role_credentials)
    assert len(found) == 4
