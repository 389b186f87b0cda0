"""Text that came from trainers or controllers, made safe to show to a person.

Reasons, messages, error strings and seed names are chosen by whoever is on the other end of the wire.
Printed raw, an ANSI escape could recolour or clear a terminal and a newline could forge an audit line.
``printable`` escapes every control character (C0, DEL, C1), the Unicode line and paragraph separators
and the bidirectional formatting characters, the way Python's ``repr`` would.
"""

from __future__ import annotations

import re

RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""What a run id is (fullmatch): checked on every wire field that names a run, and every run-id prefix
of a tokens file, so neither can carry anything ``printable`` would have to escape."""

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every character that could move the cursor, restyle a terminal or fake a line escaped."""
    return _UNSAFE.sub(_escape, text)


def show(line: str) -> None:
    """Print one line for a person (CLI output that is not JSON)."""
    print(printable(line), flush=True)
