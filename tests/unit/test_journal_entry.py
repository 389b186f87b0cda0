"""Journal entry encoding: the one-pass line equals the canonical line, and the chain verifies."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from governor_daemon.governor import _first_non_finite
from governor_daemon.journal.entry import GENESIS_HASH, Entry, parse_line, verify_link

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    payload=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    run=st.text(max_size=20),
    key=st.one_of(st.none(), st.binary(min_size=16, max_size=32)),
)
def test_one_pass_line_is_canonical_and_verifies(payload: dict[str, object], run: str, key: bytes | None) -> None:
    """create_with_line produces exactly to_line()'s bytes, and the entry verifies with its key."""
    entry, line = Entry.create_with_line(7, "2026-11-25T00:00:00.000000Z", run, "kind", payload, GENESIS_HASH, key)
    assert line == entry.to_line()
    assert verify_link(parse_line(line), GENESIS_HASH, 7, key) is None


@settings(max_examples=200, deadline=None)
@given(losses=st.lists(st.floats(), min_size=1, max_size=50), data=st.data())
def test_first_non_finite_matches_a_plain_scan(losses: list[float], data: st.DataObject) -> None:
    """The sum-based fast path finds the same first non-finite index as checking each value."""
    grads = data.draw(st.one_of(st.just([]), st.lists(st.floats(), min_size=len(losses), max_size=len(losses))))
    expected = next(
        (i for i, x in enumerate(losses) if not math.isfinite(x) or (grads and not math.isfinite(grads[i]))), None
    )
    assert _first_non_finite(losses, grads) == expected
