"""The README quotes tests/benchmarks/RESULTS.md verbatim (make bench writes both)."""

from __future__ import annotations

from tests.benchmarks.run_all import BEGIN, END, README, RESULTS, quoted_block


def test_readme_quotes_the_committed_results() -> None:
    text = README.read_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    block = text[start : text.index(END)].strip("\n")
    assert block == quoted_block(RESULTS.read_text()), "README and RESULTS.md differ: run make bench"
