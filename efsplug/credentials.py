"""AWS credentials for `iam` mounts, from the sources efs-utils users rely on, in its order.

The source that answered is returned with the credentials so the supervisor can renew the
certificate later from the same place (a task's credentials endpoint, a profile, ...).
A `CredentialSource` names where to look, not what was found; a task's credentials URI
in it is shown only as a tag (see SECRET_DETAIL_KINDS).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Tuple

from efsplug.errors import shown
from efsplug.imds import InstanceMetadata, MetadataUnavailable, http_request

if TYPE_CHECKING:
    from efsplug.sigv4 import AwsCredentials

ECS_CREDENTIALS_ENDPOINT = "http://169.254.170.2"
TIMEOUT_SECONDS = 3.0
# efs-utils' session name: a role's trust or session policies may be written against it.
WEB_IDENTITY_SESSION = "efs-mount-helper"


class CredentialsUnavailable(Exception):
    """No credentials from the requested or any default source; the message says where we looked."""


# A task's credentials URI is itself a credential: whoever knows it on the host can fetch
# the task role's keys. Such details are kept (in the root-only record, to renew) but only
# ever shown as a short tag that cannot be turned back into the URI.
SECRET_DETAIL_KINDS = ("awscredsuri", "container")


def detail_tag(detail: str) -> str:
    return "#" + hashlib.sha256(detail.encode("utf-8", "surrogateescape")).hexdigest()[:8]


@dataclass(frozen=True)
class CredentialSource:
    kind: str  # awscredsuri | profile | container | webidentity | instance
    # The URI, profile name, or "<role ARN> <token file>" (an ARN has no spaces; without
    # the file, AWS_WEB_IDENTITY_TOKEN_FILE names it). A URI is secret: see __str__.
    detail: str = ""

    def __str__(self) -> str:
        """What logs, errors and status show: a secret detail as its tag only."""
        if not self.detail:
            return self.kind
        if self.kind in SECRET_DETAIL_KINDS:
            return f"{self.kind} {detail_tag(self.detail)}"
        return f"{self.kind}:{self.detail}"

    @property
    def persisted(self) -> str:
        """The full form, for the root-only mount record the supervisor renews from; never shown."""
        return f"{self.kind}:{self.detail}" if self.detail else self.kind

    @classmethod
    def parse(cls, text: str) -> "CredentialSource":
        kind, _, detail = text.partition(":")
        if kind not in _FETCHERS:
            raise ValueError(f"unknown credential source kind {shown(kind)}")
        return cls(kind, detail)


def shown_source(persisted: Optional[str]) -> Optional[str]:
    """A record's credential source as it may be shown (see CredentialSource.__str__)."""
    if not persisted:
        return persisted
    try:
        return str(CredentialSource.parse(persisted))
    except ValueError:
        return "unknown source"


def find_credentials(
    *,
    awsprofile: Optional[str] = None,
    awscredsuri: Optional[str] = None,
    rolearn: Optional[str] = None,
    jwtpath: Optional[str] = None,
    region: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
) -> Tuple[AwsCredentials, CredentialSource]:
    """The first source that has credentials, in efs-utils' order.

    An explicit awscredsuri, awsprofile or rolearn+jwtpath is the only source tried:
    silently falling back to the instance role would mount with an identity the operator
    did not ask for. ``region`` picks the regional STS endpoint for web identity.
    """
    explicit = None
    if awscredsuri:
        explicit = CredentialSource("awscredsuri", awscredsuri)
    elif awsprofile:
        explicit = CredentialSource("profile", awsprofile)
    elif rolearn and jwtpath:
        explicit = CredentialSource("webidentity", f"{rolearn} {jwtpath}")
    if explicit is not None:
        return fetch_credentials(explicit, environ=environ, region=region), explicit
    tried: List[str] = []
    for source in _default_chain(environ):
        try:
            return fetch_credentials(source, environ=environ, region=region), source
        except CredentialsUnavailable as exc:
            tried.append(str(exc))
    raise CredentialsUnavailable(
        "no AWS credentials found for iam (tried: " + "; ".join(tried) + "); "
        "pass awsprofile=<name> or awscredsuri=<path>, or attach an instance role"
    )


def fetch_credentials(
    source: CredentialSource, *, environ: Mapping[str, str] = os.environ, region: Optional[str] = None,
) -> AwsCredentials:
    """Credentials from exactly this source (used again for renewal)."""
    return _FETCHERS[source.kind](source.detail, environ, region)


def _default_chain(environ: Mapping[str, str]) -> List[CredentialSource]:
    chain = [CredentialSource("profile", environ.get("AWS_PROFILE") or "default")]
    if environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        chain.append(CredentialSource("container", environ["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]))
    elif environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        chain.append(CredentialSource("container", environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"]))
    role, token_file = environ.get("AWS_ROLE_ARN", ""), environ.get("AWS_WEB_IDENTITY_TOKEN_FILE", "")
    if role and token_file:
        # Record the file too, so the supervisor (another environment) renews from it.
        plain = " " not in role and " " not in token_file
        chain.append(CredentialSource("webidentity", f"{role} {token_file}" if plain else role))
    chain.append(CredentialSource("instance"))
    return chain


def _from_task_endpoint(uri: str, environ: Mapping[str, str], _region: Optional[str] = None) -> AwsCredentials:
    return _get_container_json(ECS_CREDENTIALS_ENDPOINT + uri, headers={}, label=f"awscredsuri {detail_tag(uri)}")


def _from_container_env(detail: str, environ: Mapping[str, str], _region: Optional[str] = None) -> AwsCredentials:
    if detail.startswith("/"):
        return _get_container_json(ECS_CREDENTIALS_ENDPOINT + detail, headers={}, label=f"container credentials {detail_tag(detail)}")
    headers = {}
    token_file = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    if token:
        headers["Authorization"] = token
    return _get_container_json(detail, headers=headers, label="container credentials (full URI)")


def _get_container_json(url: str, *, headers: Mapping[str, str], label: str) -> AwsCredentials:
    from efsplug.sigv4 import AwsCredentials

    try:
        status, text = http_request("GET", url, headers, TIMEOUT_SECONDS)
    except OSError as exc:
        reason = str(exc) or type(exc).__name__
        raise CredentialsUnavailable(f"{label} did not answer ({reason}); is the ECS agent running?") from None
    if status != 200:
        raise CredentialsUnavailable(
            f"{label} answered HTTP {status}; the task's credentials are gone (task stopped?) or the URI is wrong"
        )
    try:
        return AwsCredentials.from_document(text)
    except ValueError:
        raise CredentialsUnavailable(f"{label} answered without AccessKeyId/SecretAccessKey") from None


def _from_profile(name: str, environ: Mapping[str, str], _region: Optional[str] = None) -> AwsCredentials:
    home = environ.get("HOME", "/root")
    creds_file = environ.get("AWS_SHARED_CREDENTIALS_FILE", f"{home}/.aws/credentials")
    config_file = environ.get("AWS_CONFIG_FILE", f"{home}/.aws/config")
    if not any(os.path.exists(os.path.expanduser(f)) for f in (creds_file, config_file)):
        # The usual case on instances and in tasks; not worth importing botocore for.
        raise CredentialsUnavailable(f"profile {name!r}: neither {creds_file} nor {config_file} exists")
    from efsplug.sigv4 import AwsCredentials

    # The shared files' rules (botocore's and efs-utils'): the credentials file names the
    # profile itself, the config file `profile <name>` (and `default` as it is).
    for path, sections in ((creds_file, [name]), (config_file, [f"profile {name}"] + (["default"] * (name == "default")))):
        try:
            keys = _ini_section(os.path.expanduser(path), sections)
        except (OSError, ValueError):  # never quote the file: it holds secrets
            raise CredentialsUnavailable(f"profile {name!r}: cannot read {creds_file} or {config_file}") from None
        if keys is None:
            continue
        access, secret = keys.get("aws_access_key_id"), keys.get("aws_secret_access_key")
        if access and secret:
            return AwsCredentials(access, secret, keys.get("aws_session_token") or None)
        if access or secret:  # half a key pair is a broken profile, not an absent one
            raise CredentialsUnavailable(f"profile {name!r}: cannot read {creds_file} or {config_file}")
    raise CredentialsUnavailable(f"profile {name!r} has no keys in {creds_file} or {config_file}")


_MAX_PROFILE_FILE = 1 << 20


def _ini_section(path: str, sections: List[str]) -> Optional[Dict[str, str]]:
    """The first of sections in the INI file at path (None if the file or section is absent).

    configparser rather than botocore: botocore's import alone costs a mount.efs about
    60 ms, and reading two small INI files is all that is needed here.
    """
    import configparser

    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_PROFILE_FILE + 1)
    except FileNotFoundError:
        return None
    if len(raw) > _MAX_PROFILE_FILE:
        raise ValueError("larger than any credentials file")
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(raw.decode("utf-8"))
    except configparser.Error as exc:
        raise ValueError(type(exc).__name__) from None
    for section in sections:
        if parser.has_section(section):
            return {k.lower(): v.strip() for k, v in parser.items(section)}
    return None


def _from_web_identity(detail: str, environ: Mapping[str, str], region: Optional[str] = None) -> AwsCredentials:
    """AssumeRoleWithWebIdentity, as efs-utils calls it (rolearn/jwtpath or the AWS_ variables)."""
    import botocore
    import botocore.config
    import botocore.exceptions
    import botocore.session

    from efsplug.sigv4 import AwsCredentials

    role_arn, _, token_file = detail.partition(" ")
    token_file = token_file or environ.get("AWS_WEB_IDENTITY_TOKEN_FILE", "")
    label = f"web identity for {role_arn}"
    try:
        token = Path(token_file).read_text().strip() if token_file else ""
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise CredentialsUnavailable(f"{label}: cannot read token file {token_file} ({reason})") from None
    if not token:
        raise CredentialsUnavailable(f"{label}: no token (jwtpath= or AWS_WEB_IDENTITY_TOKEN_FILE names an empty file)")
    # The call is unsigned: no credential lookup (and no IMDS round trip) to make it.
    config = botocore.config.Config(signature_version=botocore.UNSIGNED, connect_timeout=TIMEOUT_SECONDS,
                                    read_timeout=TIMEOUT_SECONDS, retries={"max_attempts": 2})
    try:
        client = botocore.session.get_session().create_client(
            "sts", region_name=region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None,
            endpoint_url=environ.get("AWS_ENDPOINT_URL_STS") or environ.get("AWS_ENDPOINT_URL") or None,
            config=config,
        )
        found = client.assume_role_with_web_identity(
            RoleArn=role_arn, RoleSessionName=WEB_IDENTITY_SESSION, WebIdentityToken=token,
        )["Credentials"]
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise CredentialsUnavailable(
            f"{label}: STS refused AssumeRoleWithWebIdentity ({code}); check the role's trust policy "
            f"and the token in {token_file}"
        ) from None
    except (botocore.exceptions.BotoCoreError, KeyError) as exc:
        raise CredentialsUnavailable(f"{label}: STS did not answer ({type(exc).__name__})") from None
    return AwsCredentials(found["AccessKeyId"], found["SecretAccessKey"], found["SessionToken"], found.get("Expiration"))


def _from_instance_role(_detail: str, environ: Mapping[str, str], _region: Optional[str] = None) -> AwsCredentials:
    """The instance profile's role, through efsplug's IMDS client (v2, then v1).

    botocore's InstanceMetadataFetcher does the same requests, but importing it costs
    more than the whole rest of a mount on a small instance.
    """
    try:
        return InstanceMetadata.from_environment(environ).role_credentials()
    except MetadataUnavailable as exc:
        raise CredentialsUnavailable(
            f"instance role: {exc} (no role attached, or IMDS hop limit too low)"
        ) from None


_FETCHERS: Mapping[str, Callable[[str, Mapping[str, str], Optional[str]], AwsCredentials]] = {
    "awscredsuri": _from_task_endpoint,
    "profile": _from_profile,
    "container": _from_container_env,
    "webidentity": _from_web_identity,
    "instance": _from_instance_role,
}
