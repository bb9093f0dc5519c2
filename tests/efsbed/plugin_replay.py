"""Guest side: plugin requests posted to the agent's socket exactly as dockerd posts them.

    python -m efsbed.plugin_replay <socket> '<json [[endpoint, payload], ...]>'

One kept-alive connection, no Content-Type, a trailing newline (efsbed.agent_harness's
PluginClient); prints one JSON list of {"status", "body"}, one per request, in order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from efsbed.agent_harness import PluginClient


def main(socket_path: str, steps: str) -> int:
    answers = []
    with PluginClient(Path(socket_path), timeout=150) as client:  # over dockerd's own 2-minute Mount timeout
        for endpoint, payload in json.loads(steps):
            reply = client.call(endpoint, payload)
            answers.append({"status": reply.status, "body": reply.body})
    print(json.dumps(answers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
