"""Journal entries: canonical JSON, the hash chain, parsing and verification of one line.

An entry is one JSON object per line with keys ``seq`` (the cursor), ``ts`` (UTC, RFC 3339),
``run``, ``kind``, ``payload``, ``prev_hash`` and ``hash``. ``hash`` is SHA-256 (or HMAC-SHA-256 with a
key) over the canonical JSON of every other key, so any changed byte breaks the chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

GENESIS_HASH = "0" * 64


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, UTF-8 text, no NaN (callers encode non-finite floats as strings)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def chain_hash(body: dict[str, Any], key: bytes | None) -> str:
    """Hash of an entry body (everything but ``hash``), keyed when ``key`` is set."""
    data = canonical_json(body).encode("utf-8")
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def utc_now_iso(epoch_s: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-11-25T18:00:00.123456Z."""
    fraction_s, whole_s = math.modf(epoch_s)  # the rounding datetime.fromtimestamp applies
    seconds, fraction = int(whole_s), round(fraction_s * 1_000_000)
    if fraction >= 1_000_000:
        seconds, fraction = seconds + 1, fraction - 1_000_000
    if seconds != _last_second[0]:  # strftime once per second; every entry of the hot path needs a stamp
        _last_second[:] = [seconds, datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_last_second[1]}.{fraction:06d}Z"


_last_second: list[Any] = [None, ""]


@dataclass(frozen=True)
class Entry:
    """One journal entry."""

    seq: int
    ts: str
    run: str
    kind: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str
    payload_json: str = field(default="", compare=False, repr=False)
    """The payload's canonical JSON when the entry was created here ("" when parsed from a line)."""

    def body(self) -> dict[str, Any]:
        """The hashed part."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "run": self.run,
            "kind": self.kind,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
        }

    def to_line(self) -> str:
        """The canonical JSON line, newline included."""
        return canonical_json({**self.body(), "hash": self.hash}) + "\n"

    @classmethod
    def create(
        cls, seq: int, ts: str, run: str, kind: str, payload: dict[str, Any], prev_hash: str, key: bytes | None
    ) -> Entry:
        """Build and hash a new entry."""
        entry, _ = cls.create_with_line(seq, ts, run, kind, payload, prev_hash, key)
        return entry

    @classmethod
    def create_with_line(
        cls, seq: int, ts: str, run: str, kind: str, payload: dict[str, Any], prev_hash: str, key: bytes | None
    ) -> tuple[Entry, str]:
        """Build, hash and encode a new entry; returns (entry, canonical line).

        The payload is encoded once. The body's other keys sort around it (kind < payload < prev_hash < run
        < seq < ts), so the canonical body is assembled around that text; "hash" sorts before every key, so
        the line is the hashed body with the hash spliced in front: the same bytes ``to_line`` produces.
        """
        if type(seq) is not int:
            raise TypeError(f"seq must be an int, got {type(seq).__name__}")
        payload_json = canonical_json(payload)
        body = (
            f'{{"kind":{_string(kind)},"payload":{payload_json},"prev_hash":{_string(prev_hash)},'
            f'"run":{_string(run)},"seq":{seq},"ts":{_string(ts)}}}'
        )
        data = body.encode("utf-8")
        digest = hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()
        line = '{"hash":"' + digest + '",' + body[1:] + "\n"
        return cls(seq, ts, run, kind, payload, prev_hash, digest, payload_json), line


_string = json.JSONEncoder(ensure_ascii=False).encode
_HASH_PREFIX = b'{"hash":"'
_BODY_AT = len(_HASH_PREFIX) + 64 + 2  # after '{"hash":"<64 hex>",'

"""Canonical JSON of one string (what canonical_json gives for a str)."""


class Committed(NamedTuple):
    """A durable entry as WatchEvents sends it: strings and an int, no payload dict. The daemon keeps tens
    of thousands in memory (as plain tuples, which the garbage collector untracks); with dict payloads
    every full collection traversed them, pausing the event loop for about 100 ms under load."""

    seq: int
    ts: str
    run: str
    kind: str
    payload_json: str
    hash: str

    @classmethod
    def of(cls, entry: Entry) -> Committed:
        """From an entry (its payload encoded again only if it was parsed from a line)."""
        text = entry.payload_json or canonical_json(entry.payload)
        return cls(entry.seq, entry.ts, entry.run, entry.kind, text, entry.hash)


class EntryError(ValueError):
    """A line that is not a well-formed entry (``reason`` says why)."""


def parse_line(line: str) -> Entry:
    """Parse one journal line; raises EntryError if it is not a complete, well-formed entry."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EntryError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise EntryError("not a JSON object")
    try:
        entry = Entry(
            seq=obj["seq"],
            ts=obj["ts"],
            run=obj["run"],
            kind=obj["kind"],
            payload=obj["payload"],
            prev_hash=obj["prev_hash"],
            hash=obj["hash"],
        )
    except KeyError as exc:
        raise EntryError(f"missing key {exc.args[0]!r}") from None
    if not isinstance(entry.seq, int) or not isinstance(entry.payload, dict):
        raise EntryError("seq must be an integer and payload an object")
    return entry


def verify_link(
    entry: Entry, prev_hash: str, expected_seq: int | None, key: bytes | None, raw: bytes = b""
) -> str | None:
    """Return why ``entry`` does not continue the chain, or None if it does.

    With ``raw`` (the line the entry was parsed from), a line in the writer's canonical form is checked
    by hashing its own bytes (the body is the line without its leading hash): no re-encoding, so start-up
    verifies a journal at hashing speed. Any other line is checked by re-encoding its body.
    """
    if entry.prev_hash != prev_hash:
        return f"prev_hash {entry.prev_hash[:12]}… does not match the previous entry's hash {prev_hash[:12]}…"
    if expected_seq is not None and entry.seq != expected_seq:
        return f"seq {entry.seq} where {expected_seq} was expected"
    if raw[: len(_HASH_PREFIX)] == _HASH_PREFIX and raw[_BODY_AT - 2 : _BODY_AT] == b'",':
        data = b"{" + raw[_BODY_AT:]
        digest = hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()
        if digest == entry.hash:
            return None
    if chain_hash(entry.body(), key) != entry.hash:
        return "hash does not match the entry's content (modified, or a different HMAC key)"
    return None
