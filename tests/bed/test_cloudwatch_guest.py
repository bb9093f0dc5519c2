"""[cloudwatch-log] enabled in the kernel guest: a real `mount -t efs -o tls` ships its line.

The guest's mount.efs reaches the bed's moto at 10.0.2.2 through AWS_ENDPOINT_URL_LOGS and
signs with the instance role's credentials (botocore's default chain, the bed's IMDS), as on
EC2; the host then reads the log group, its retention policy and the stream with botocore.
"""

from __future__ import annotations

import secrets

import pytest

from efsbed.aws import client
from efsbed.bed import Bed
from efsbed.guestmount import mount_of, record_for, write_and_find

pytestmark = pytest.mark.guest

INSTANCE_ID = "i-0efsbed000000000"  # the bed's IMDS identity document


def test_tls_mount_line_reaches_cloudwatch_logs(bed: Bed, clean_guest: Bed) -> None:
    group = f"/efsplug/guest/{secrets.token_hex(4)}/{{fs_id}}"
    default = f"[mount]\nstunnel_cafile = {bed.ca.cert_path}\n"
    bed.write_guest_config(default + f"[cloudwatch-log]\nenabled = true\nlog_group_name = {group}\n"
                                     "retention_in_days = 7\n")
    try:
        env = {"AWS_ENDPOINT_URL_LOGS": f"http://10.0.2.2:{bed.moto.port}"}
        with mount_of(bed, "/mnt/cwlog", "tls", env=env):  # stderr empty: delivered within the bound
            write_and_find(bed, "/mnt/cwlog", bed.export_dir)
            port = record_for(bed, "/mnt/cwlog")["port"]
    finally:
        bed.write_guest_config(default)
    logs = client("logs", bed.moto.endpoint_url, bed.region)
    name = group.replace("{fs_id}", bed.fs_id)
    (found,) = [g for g in logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"] if g["logGroupName"] == name]
    assert found.get("retentionInDays") == 7
    stream = f"{bed.fs_id} - {INSTANCE_ID} - mount.log"  # efs-utils' stream name
    events = logs.get_log_events(logGroupName=name, logStreamName=stream, startFromHead=True)["events"]
    assert [e["message"] for e in events] == [  # mount(8) adds rw
        f"Successfully mounted {bed.fs_id}:/ at /mnt/cwlog (options tls,rw; through 127.0.0.1:{port})"]
