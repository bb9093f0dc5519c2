"""Mount options: one parser for the mount helper and the Docker volume plugin.

Policy choices (documented here because users will hit them):
- A typed option given twice: the last one wins, as with mount(8) and mount.nfs.
- Options that only mount(8)/systemd understand (``_netdev``, ``nofail``,
  ``noauto``, ``x-*`` ...) are accepted from fstab and dropped, never sent to NFS.
- Every efs-utils 3.2 option is typed, taken as a no-op, or refused with the reason
  (the catalogue is in ``optionvalues``; docs/efs-utils-compat.md is the table).
- Every name and value is refused if it holds a control or otherwise
  non-printable character; values that can reach the tunnel configuration or
  a URL are checked by strict patterns, so ``=``, ``[`` or a newline can never
  smuggle configuration into stunnel.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

from efsplug.errors import UsageError, shown
from efsplug.optionvalues import (  # noqa: F401  (validate_region: naming and mount take it from here)
    FLAG_OPTIONS,
    FS_ID_RE,
    NOOP_FLAGS,
    OPTION_NAME_RE,
    REFUSED,
    VALUE_OPTIONS,
    check_printable as _check_printable,
    has_dotdot as _has_dotdot,
    parse_ip,
    typed_value,
    validate_region,
)

USAGE = "mount.efs <fs-id>[:/path] <mountpoint> [-o <options>] [-f] [-n] [-s] [-v]"

# Understood by mount(8) or systemd, meaningless (or fatal) to mount.nfs4.
MOUNT8_ONLY = frozenset(
    {"_netdev", "nofail", "auto", "noauto", "defaults", "user", "nouser", "users", "owner", "group", "comment"}
)

NFS_DEFAULTS: Tuple[Tuple[str, Optional[str]], ...] = (
    ("nfsvers", "4.1"),
    ("rsize", "1048576"),
    ("wsize", "1048576"),
    ("hard", None),
    ("timeo", "600"),
    ("retrans", "2"),
    ("noresvport", None),
)
# A user option on the right replaces every default named on the left.
_OVERRIDES: Dict[str, Tuple[str, ...]] = {
    "vers": ("nfsvers",), "nfsvers": ("nfsvers",), "soft": ("hard",), "hard": ("hard",),
    "resvport": ("noresvport",), "noresvport": ("noresvport",),
}

NfsOptions = Tuple[Tuple[str, Optional[str]], ...]


@dataclass(frozen=True)
class MountOptions:
    """What ``-o`` says, typed; everything efsplug does not own is in ``nfs_options``."""

    tls: bool = False
    tlsport: Optional[int] = None
    iam: bool = False
    awsprofile: Optional[str] = None
    awscredsuri: Optional[str] = None
    rolearn: Optional[str] = None  # with jwtpath: web identity (AssumeRoleWithWebIdentity)
    jwtpath: Optional[str] = None
    accesspoint: Optional[str] = None
    region: Optional[str] = None
    az: Optional[str] = None
    mounttargetip: Optional[str] = None  # canonical IPv4 or IPv6 text
    netns: Optional[str] = None
    ocsp: Optional[bool] = None  # True: ocsp, False: noocsp, None: config decides
    verify: Optional[int] = None
    cafile: Optional[str] = None
    crossaccount: bool = False
    nfs_options: NfsOptions = ()


@dataclass(frozen=True)
class MountRequest(MountOptions):
    """A complete, validated request; ``mountpoint`` is None for the Docker plugin."""

    fs_id: str = ""
    path: str = "/"
    mountpoint: Optional[str] = None
    fake: bool = False
    no_mtab: bool = False
    sloppy: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        # Guard against building a request that skipped parse_device.
        if not FS_ID_RE.fullmatch(self.fs_id):
            raise UsageError(f"file system id {shown(self.fs_id)} is invalid; use fs- and 8 or 17 hex digits")


# --- option string ---------------------------------------------------------------------

def _split_items(text: str) -> List[Tuple[str, Optional[str]]]:
    items: List[Tuple[str, Optional[str]]] = []
    for raw in text.split(","):
        if raw == "":
            continue  # tolerate ",," and trailing commas, as mount(8) does
        _check_printable("mount option", raw)
        name, sep, value = raw.partition("=")
        items.append((name, value if sep else None))
    return items


def parse_options(text: str) -> MountOptions:
    """Parse and validate an ``-o`` string, with the rules that tie options together."""
    typed: Dict[str, object] = {}
    noop = set()
    nfs: List[Tuple[str, Optional[str]]] = []
    for name, value in _split_items(text):
        if name[:2] in ("x-", "X-") or name in MOUNT8_ONLY:
            continue
        if not OPTION_NAME_RE.fullmatch(name):
            raise UsageError(f"mount option name {shown(name)} is invalid; use letters, digits, _ and -")
        if name in REFUSED:
            raise UsageError(REFUSED[name])
        if name in FLAG_OPTIONS or name in NOOP_FLAGS:
            if value is not None:
                raise UsageError(f"option '{name}' takes no value; write just {name}")
            if name in NOOP_FLAGS:
                noop.add(name)
            else:
                typed[name] = True
        elif name in VALUE_OPTIONS:
            if not value:
                raise UsageError(f"option '{name}' needs a value; write {name}=<value>")
            typed[name] = typed_value(name, value)  # last one wins
        else:
            nfs.append((name, value))
    if "notls" in noop and typed.get("tls"):
        raise UsageError("options 'tls' and 'notls' exclude each other; keep one")
    return _combine(typed, tuple(nfs))


def _combine(typed: Dict[str, object], nfs: NfsOptions) -> MountOptions:
    if typed.get("ocsp") and typed.get("noocsp"):
        raise UsageError("options 'ocsp' and 'noocsp' exclude each other; keep one")
    ocsp = True if typed.pop("ocsp", None) else (False if typed.pop("noocsp", None) else None)
    options = MountOptions(ocsp=ocsp, nfs_options=nfs, **typed)  # type: ignore[arg-type]
    _check_rules(options)
    return options


def _check_rules(o: MountOptions) -> None:
    if o.iam and not o.tls:
        raise UsageError("option 'iam' requires 'tls'; add tls to -o")
    if o.accesspoint and not o.tls:
        raise UsageError("option 'accesspoint' requires 'tls'; add tls to -o")
    # efs-utils quietly ignores half a web identity pair; here it is a typo to point out.
    if (o.rolearn is None) != (o.jwtpath is None):
        given, missing, what = (("rolearn", "jwtpath", "<web identity token file>") if o.jwtpath is None
                                else ("jwtpath", "rolearn", "<IAM role ARN>"))
        raise UsageError(f"option '{given}' needs '{missing}'; add {missing}={what}")
    for name in ("awsprofile", "awscredsuri", "rolearn", "jwtpath"):
        if getattr(o, name) is not None and not o.iam:
            raise UsageError(f"option '{name}' requires 'iam'; add iam (and tls) to -o")
    # One explicit identity: efs-utils would pick one silently, in an order users cannot see.
    chosen = [name for name in ("awsprofile", "awscredsuri", "rolearn") if getattr(o, name) is not None]
    if len(chosen) > 1:
        raise UsageError(f"options '{chosen[0]}' and '{chosen[1]}' exclude each other; keep one")
    if o.tls and any(name == "port" for name, _ in o.nfs_options):
        raise UsageError("options 'port' and 'tls' exclude each other; remove port (use tlsport for the tunnel)")
    if o.crossaccount and o.mounttargetip:
        raise UsageError("options 'mounttargetip' and 'crossaccount' exclude each other; crossaccount finds "
                         "the mount target by AZ id, so remove mounttargetip")


# --- device and argv ------------------------------------------------------------------

def parse_device(text: str) -> Tuple[str, str]:
    """``fs-<id>[:/path]`` → (fs_id, path); path defaults to ``/``."""
    _check_printable("device", text)
    fs_id, sep, path = text.partition(":")
    if not FS_ID_RE.fullmatch(fs_id):
        raise UsageError(
            f"device {shown(text)} is not an EFS file system; use fs-<8 or 17 lowercase hex digits>[:/path]"
        )
    if not sep:
        return fs_id, "/"
    if not path.startswith("/"):
        raise UsageError(f"path {shown(path)} in device is not absolute; write {fs_id}:/<path>")
    if _has_dotdot(path):
        raise UsageError(f"path {shown(path)} in device contains '..'; write the path without it")
    if "," in path:
        raise UsageError(f"path {shown(path)} in device contains a comma; rename the directory or mount its parent")
    return fs_id, path


def _request(device: str, options: MountOptions, **extra) -> MountRequest:
    fs_id, path = parse_device(device)
    values = {f.name: getattr(options, f.name) for f in fields(MountOptions)}
    return MountRequest(fs_id=fs_id, path=path, **values, **extra)


def parse_mount_args(argv: Sequence[str]) -> MountRequest:
    """Arguments as mount(8) passes them: ``<device> <dir> [-sfnv] [-o opts] [-t type]``."""
    positional: List[str] = []
    opts: List[str] = []
    flags = {"f": False, "n": False, "s": False, "v": False}
    args = list(argv)
    i = 0
    only_positional = False
    while i < len(args):
        arg = args[i]
        i += 1
        if only_positional or not arg.startswith("-") or arg == "-":
            positional.append(arg)
        elif arg == "--":
            only_positional = True
        elif arg.startswith("-o") or arg.startswith("-t"):
            value = arg[2:]
            if not value:
                if i >= len(args):
                    raise UsageError(f"argument {arg} needs a value; usage: {USAGE}")
                value = args[i]
                i += 1
            if arg.startswith("-o"):
                opts.append(value)
        elif all(ch in flags for ch in arg[1:]):
            for ch in arg[1:]:
                flags[ch] = True
        else:
            raise UsageError(f"unknown argument {shown(arg)}; usage: {USAGE}")
    if len(positional) != 2:
        raise UsageError(f"expected a device and a mount point, got {len(positional)} arguments; usage: {USAGE}")
    device, mountpoint = positional
    _check_printable("mount point", mountpoint)
    if not mountpoint.startswith("/"):
        raise UsageError(f"mount point {shown(mountpoint)} is not absolute; give the full path")
    options = parse_options(",".join(opts))
    return _request(
        device, options, mountpoint=mountpoint,
        fake=flags["f"], no_mtab=flags["n"], sloppy=flags["s"], verbose=flags["v"],
    )


def request_from_driver_opts(device: str, o: str) -> MountRequest:
    """Docker/ECS driver options ``device=`` and ``o=`` (no mount point yet)."""
    if not device:
        raise UsageError("volume option 'device' is missing; add -o device=fs-<id>[:/path]")
    return _request(device, parse_options(o or ""))


# --- NFS options -----------------------------------------------------------------------

def nfs_mount_options(request: MountOptions, *, tunnel_port: Optional[int]) -> str:
    """The ``-o`` for mount.nfs4: efs-utils' defaults, the tunnel port, then the user's options."""
    if request.tls != (tunnel_port is not None):
        raise ValueError("tunnel_port must be given exactly when the request uses TLS")
    user = request.nfs_options
    user_names = {name for name, _ in user}
    replaced = set()
    for name in user_names:
        replaced.update(_OVERRIDES.get(name, (name,)))
    defaults = [(n, v) for n, v in NFS_DEFAULTS if n not in replaced]
    if "minorversion" in user_names and not user_names & {"vers", "nfsvers"}:
        # nfsvers=4.1 would contradict a user's minorversion; let theirs decide.
        defaults = [("nfsvers", "4") if n == "nfsvers" else (n, v) for n, v in defaults]
    items = defaults + ([("port", str(tunnel_port))] if tunnel_port is not None else []) + list(user)
    return ",".join(name if value is None else f"{name}={value}" for name, value in items)


def nfs_device(host: str, path: str) -> str:
    """``host:path`` for mount.nfs4; an IPv6 host in brackets, made only from a parsed address."""
    try:
        address = parse_ip(host)
    except ValueError:
        return f"{host}:{path}"  # a DNS name
    return f"[{address}]:{path}" if address.version == 6 else f"{address}:{path}"
