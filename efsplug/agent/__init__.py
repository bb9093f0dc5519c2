"""`efsplug agent`: the Docker volume plugin ECS uses for efsVolumeConfiguration.

protocol (wire format, pure) -> plugin (endpoint logic over volumes + store + a mounter)
-> server (HTTP/1.1 on a unix socket); reconcile runs once at start; command wires it up.
"""
