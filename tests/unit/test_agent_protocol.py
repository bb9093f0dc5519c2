"""The plugin wire format: dockerd's real bodies decode, every malformed one is refused."""

from __future__ import annotations

import json

import pytest

from efsplug.agent import protocol as p
from efsplug.agent.protocol import CreateRequest, Empty, MountIdRequest, NameRequest, ProtocolError

ID = "3f1a" * 16


@pytest.mark.parametrize(
    "endpoint, body, expected",
    [
        (p.ACTIVATE, b"", Empty()),
        (p.CAPABILITIES, b"{}\n", Empty()),
        (p.LIST, b"{}\n", Empty()),
        (p.LIST, b"not even json", Empty()),  # nothing in a List body is used
        (p.CREATE, b'{"Name":"v1","Opts":{"type":"efs","device":"fs-12345678"}}\n',
         CreateRequest("v1", {"type": "efs", "device": "fs-12345678"})),
        (p.CREATE, b'{"Name":"v1","Opts":null}\n', CreateRequest("v1", {})),  # docker run --volume-driver
        (p.CREATE, b'{"Name":"v1"}\n', CreateRequest("v1", {})),
        (p.REMOVE, b'{"Name":"v1"}\n', NameRequest("v1")),
        (p.GET, b'{"Name":"ecs-task-1-data-e2b4f1c8a9d0"}\n', NameRequest("ecs-task-1-data-e2b4f1c8a9d0")),
        (p.PATH, b'{"Name":"v.1_x"}\n', NameRequest("v.1_x")),
        (p.MOUNT, ('{"Name":"v1","ID":"%s"}\n' % ID).encode(), MountIdRequest("v1", ID)),
        (p.UNMOUNT, ('{"Name":"v1","ID":"%s"}\n' % ID).encode(), MountIdRequest("v1", ID)),
    ],
)
def test_dockerd_bodies_decode(endpoint: str, body: bytes, expected: object) -> None:
    assert p.decode(endpoint, body) == expected


@pytest.mark.parametrize(
    "endpoint, body, message",
    [
        ("/VolumeDriver.Frobnicate", b"{}", "unknown endpoint '/VolumeDriver.Frobnicate'"),
        ("/", b"", "unknown endpoint"),
        (p.GET, b'{"Name":', "not valid JSON"),
        (p.GET, b"\xff\xfe", "not valid JSON"),
        (p.GET, b"[1,2]", "not a JSON object"),
        pytest.param(p.GET, b"[" * 100_000, "nests JSON too deeply", id="deep-array"),
        pytest.param(p.CREATE, b'{"Name":"v","Opts":' + b'{"a":' * 100_000, "nests JSON too deeply", id="deep-opts"),
        # int() of a million digits took 4 s, holding the interpreter, on Python 3.9.2
        pytest.param(p.GET, b'{"Name":"v","x":' + b"9" * 1_000_000 + b"}", "over 40 digits", id="huge-number"),
        (p.GET, b"", "volume name is missing"),
        (p.GET, b'{"Name":""}', "volume name is missing"),
        (p.GET, b'{"Name":7}', "volume name is missing"),
        (p.GET, b'{"Name":"../etc"}', "volume name '../etc' is invalid"),
        (p.GET, b'{"Name":"a/b"}', "is invalid"),
        (p.GET, b'{"Name":".hidden"}', "is invalid"),
        (p.GET, b'{"Name":"bad\\nname"}', "'bad\\nname' is invalid"),
        (p.GET, json.dumps({"Name": "x" * 201}).encode(), "is invalid"),
        (p.CREATE, b'{"Name":"v","Opts":["device"]}', "volume options are not a JSON object"),
        (p.CREATE, b'{"Name":"v","Opts":{"device":1}}', "volume option 'device' is not a string"),
        (p.MOUNT, b'{"Name":"v"}', "mount ID is missing"),
        (p.MOUNT, b'{"Name":"v","ID":""}', "mount ID '' is invalid"),
        (p.MOUNT, b'{"Name":"v","ID":5}', "mount ID '5' is invalid"),
        (p.UNMOUNT, b'{"Name":"v","ID":"a b"}', "mount ID 'a b' is invalid"),
    ],
)
def test_malformed_requests_are_refused_with_one_line(endpoint: str, body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as err:
        p.decode(endpoint, body)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_answers_are_json_lines_with_the_documented_shapes() -> None:
    assert json.loads(p.encode(p.activate())) == {"Implements": ["VolumeDriver"]}
    assert json.loads(p.encode(p.capabilities())) == {"Capabilities": {"Scope": "local"}}
    assert p.encode(p.error("")).endswith(b"\n")
    assert p.mountpoint("/m") == {"Mountpoint": "/m", "Err": ""}
    vol = p.volume("v", "/m", "2024-01-01T00:00:00Z", {"Mounted": True})
    assert vol == {"Volume": {"Name": "v", "Mountpoint": "/m", "CreatedAt": "2024-01-01T00:00:00Z",
                              "Status": {"Mounted": True}}, "Err": ""}
    assert p.volume_list([]) == {"Volumes": [], "Err": ""}
