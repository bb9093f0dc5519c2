"""ECS wiring: is the ECS agent told to use the plugin, and does efsplug answer on its socket?

The ECS agent uses the volume plugin for efsVolumeConfiguration only when ecs.config
advertises `ECS_VOLUME_PLUGIN_CAPABILITIES=["efsAuth"]`; without it, it silently mounts
plain NFS without TLS or IAM. And ecs-init ships its own plugin whose systemd socket unit,
if active, holds the plugin socket in efsplug's place.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import List, Mapping

from efsplug.doctor.checks import Check, NotApplicable, Problem
from efsplug.ecsconfig import ecs_config_path, load_ecs_config

CAPABILITIES = "ECS_VOLUME_PLUGIN_CAPABILITIES"
PLUGIN_SOCKET = Path("/run/docker/plugins/amazon-ecs-volume-plugin.sock")
PLUGIN_SOCKET_ENV = "EFSPLUG_PLUGIN_SOCKET"  # where `efsplug agent --socket` serves, if not the default
ACTIVATE = b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\nContent-Length: 0\r\n\r\n"
SOCKET_TIMEOUT = 5.0


class EcsChecks:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.environ = environ
        self.config_path = ecs_config_path(environ)

    def checks(self) -> List[Check]:
        return [
            Check("ecs-efsauth", "ECS agent told to use the plugin (efsAuth)", self.efs_auth),
            Check("plugin-socket", "efsplug agent answering on the plugin socket", self.plugin_socket),
        ]

    def _is_ecs_host(self) -> bool:
        return self.config_path.exists()

    def efs_auth(self) -> str:
        if not self._is_ecs_host():
            raise NotApplicable(f"no {self.config_path}: not an ECS container instance")
        ecs = load_ecs_config(self.config_path, [CAPABILITIES])
        setting = ecs.settings.get(CAPABILITIES)
        fix = f"add the line {CAPABILITIES}=[\"efsAuth\"] to {self.config_path} and restart ecs"
        if setting is None:
            raise Problem(f"{CAPABILITIES} is not set in {self.config_path}, so the ECS agent mounts EFS volumes with "
                          "plain NFS, without TLS or IAM", fix)
        try:
            listed = json.loads(setting.value)
        except ValueError:
            listed = None
        if not isinstance(listed, list) or "efsAuth" not in listed:
            raise Problem(f"{CAPABILITIES} in {self.config_path} line {setting.line} does not list \"efsAuth\" as the "
                          "ECS agent reads it (a JSON list)", fix)
        return f"{self.config_path} line {setting.line}"

    def plugin_socket(self) -> str:
        path = Path(self.environ.get(PLUGIN_SOCKET_ENV) or PLUGIN_SOCKET)
        if not os.path.lexists(path):
            if not self._is_ecs_host():
                raise NotApplicable(f"no {path} and no {self.config_path}: no agent expected")
            raise Problem(f"nothing serves {path}", "systemctl enable --now amazon-ecs-volume-plugin")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(SOCKET_TIMEOUT)
            try:
                sock.connect(str(path))
            except OSError as exc:
                raise Problem(f"{path} does not accept connections ({exc.strerror or exc})",
                              "systemctl restart amazon-ecs-volume-plugin") from None
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            holder = _command_of(pid)
            if not any(word == "efsplug" or word.startswith("efsplug.") for word in holder.split()):
                raise Problem(f"{path} is held by {holder or 'an unknown process'} (pid {pid}), not efsplug: ecs-init's "
                              "own plugin or its socket unit", "systemctl disable --now amazon-ecs-volume-plugin.socket "
                              "&& systemctl restart amazon-ecs-volume-plugin")
            try:
                sock.sendall(ACTIVATE)
                answer = sock.recv(4096)
            except OSError as exc:
                raise Problem(f"efsplug (pid {pid}) did not answer on {path} ({exc})",
                              "see journalctl -u amazon-ecs-volume-plugin") from None
        if b"VolumeDriver" not in answer:
            raise Problem(f"efsplug (pid {pid}) answered Plugin.Activate on {path} without VolumeDriver",
                          "see journalctl -u amazon-ecs-volume-plugin")
        return f"{path}, efsplug pid {pid}"


def _command_of(pid: int) -> str:
    """The holder's first three words, program names as base names (no arguments' secrets)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()[:4096]
    except OSError:
        return ""
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    return " ".join(os.path.basename(w) if "/" in w else w for w in words[:3])
