"""The local EFS test bed: a stand-in for the cloud on one machine (see tests/efsbed/README.md)."""
