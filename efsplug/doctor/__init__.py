"""`efsplug doctor`: why a mount fails or would fail, and the fix, without mounting.

checks.py is the pure core (dependency order, outcomes, rendering); host.py, ecs.py and
target.py are the checks, each calling the mount path's own code; command.py is the CLI.
"""
