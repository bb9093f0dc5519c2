"""efsplug: attach Amazon EFS to hosts and containers over TLS, with IAM and access points."""

__version__ = "0.1.0"
