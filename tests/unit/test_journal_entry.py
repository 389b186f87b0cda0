"""Journal entry encoding: the one-pass line equals the canonical line, and the chain verifies."""

from __future__ import annotations

import gc

from hypothesis import given, settings
from hypothesis import strategies as st

from governor_daemon.journal.entry import GENESIS_HASH, Committed, Entry, canonical_json, parse_line, verify_link

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    run=st.text(max_size=20),
    kind=st.text(max_size=12),
    seq=st.integers(min_value=1, max_value=2**63),
    key=st.one_of(st.none(), st.binary(min_size=16, max_size=32)),
)
def test_one_pass_line_is_canonical_and_verifies(
    payload: dict[str, object], run: str, kind: str, seq: int, key: bytes | None
) -> None:
    """create_with_line produces exactly to_line()'s bytes, the entry verifies with its key, and the
    Committed form (what WatchEvents sends) carries the payload's canonical JSON."""
    entry, line = Entry.create_with_line(seq, "2026-11-25T00:00:00.000000Z", run, kind, payload, GENESIS_HASH, key)
    assert line == entry.to_line()
    parsed = parse_line(line)
    assert verify_link(parsed, GENESIS_HASH, seq, key) is None
    assert Committed.of(entry) == Committed.of(parsed)
    assert Committed.of(entry).payload_json == canonical_json(payload)


def test_committed_entries_are_not_tracked_by_the_garbage_collector() -> None:
    """The daemon keeps tens of thousands in memory; a full collection must not traverse them."""
    entry, _ = Entry.create_with_line(
        1, "2026-11-25T00:00:00.000000Z", "r", "vitals", {"a": {"b": [1]}}, GENESIS_HASH, None
    )
    kept = tuple(Committed.of(entry))  # as the group committer keeps it
    gc.collect()
    assert not gc.is_tracked(kept)
