"""Namespace for the Tolaria governor contract (generated code lives in tolaria.governor.v1), and what both
CLIs share: exit codes, the client's connection options, the governor address check, the KEY=VALUE policy
parser (policy_args), the structlog setup (logs), the channel to the daemon (channel), and the journal's
entries as typed records (journal)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "tolaria-governor"


def package_version() -> str:
    """The installed version of the tolaria-governor distribution ("unknown" from a bare checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
