"""Flags that several `governor` commands define alike (the connection flags are ``tolaria.client_options``)."""

from __future__ import annotations

import argparse

from tolaria.journal import EntryKind

KINDS: tuple[str, ...] = tuple(str(k) for k in EntryKind)
"""Every journal entry kind, in the order ``EntryKind`` defines them."""


def entry_kind(text: str) -> str:
    """argparse type of --kind: a known entry kind, else a usage error (exit 2) that lists the kinds: a typo
    would otherwise match nothing and exit 0."""
    if text not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown entry kind {text!r}; the kinds are: {', '.join(KINDS)}")
    return text


def add_kind_argument(parser: argparse.ArgumentParser) -> None:
    """--kind KIND (repeatable), checked against the journal's entry kinds."""
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        type=entry_kind,
        metavar="KIND",
        help=f"only this entry kind (repeatable): {', '.join(KINDS)}",
    )
