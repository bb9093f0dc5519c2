"""The bed's moto server, with EFS access points made the way EFS makes them.

moto (5.x) gives access points 8 hex digits where EFS gives 17 (mount.efs refuses the
former, as it should), creates a second access point for a repeated client token, and
creates access points on file systems that do not exist. Patched here, before moto's
own server starts: `python -m efsbed.moto_efs -H 127.0.0.1 -p <port>` takes moto_server's
arguments.
"""

from __future__ import annotations

import sys
from typing import Any


def patch() -> None:
    from moto.efs import models
    from moto.efs.exceptions import FileSystemNotFound
    from moto.moto_api._internal import mock_random

    original_init = models.AccessPoint.__init__
    original_create = models.EFSBackend.create_access_point

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        short, self.access_point_id = self.access_point_id, "fsap-" + mock_random.get_random_hex(17)
        self.access_point_arn = self.access_point_arn.replace(short, self.access_point_id)

    def create(self: Any, client_token: str, tags: Any, file_system_id: str, posix_user: Any,
               root_directory: Any) -> Any:
        if file_system_id not in self.file_systems_by_id:
            raise FileSystemNotFound(file_system_id)
        for existing in self.access_points.values():  # EFS: the same token returns the same access point
            if existing.client_token == client_token and existing.file_system_id == file_system_id:
                return existing
        return original_create(self, client_token, tags, file_system_id, posix_user, root_directory)

    models.AccessPoint.__init__ = init
    models.EFSBackend.create_access_point = create


def main() -> int:
    patch()
    from moto.server import main as moto_main

    sys.argv[0] = "moto_server"
    return moto_main() or 0


if __name__ == "__main__":
    sys.exit(main())
