"""The daemon's decision log against a real daemon: a reconnect flood is rate-limited and summarised."""

from __future__ import annotations

import uuid
from pathlib import Path

import structlog

from governor_daemon.testing import AttachClient, InProcessDaemon


def test_a_reconnect_flood_is_rate_limited_and_summarised(tmp_path: Path) -> None:
    """A trainer reattaching 40 times: every attach is journaled (generation 40), the log has the key's burst of
    20 (plus what refilled meanwhile), and the summary counts exactly the lines held back."""
    incarnation = uuid.uuid4().hex
    clients: list[AttachClient] = []
    with InProcessDaemon(tmp_path / "data") as daemon, structlog.testing.capture_logs() as captured:
        try:
            for _ in range(40):  # each replaces the previous attachment of the same incarnation
                client = AttachClient(daemon.address, "run-flood", incarnation_id=incarnation)
                client.connect()  # the Welcome leaves once the attach entry is durable (and its line written)
                clients.append(client)
            assert clients[-1].welcome is not None
            assert clients[-1].welcome.generation == 40
            assert daemon.daemon is not None
            governor = daemon.daemon.governor

            async def summarise() -> None:
                governor.decisions.flush(governor.now() + 60.0)  # as the tick would, once the interval passed

            daemon.call(summarise())
        finally:
            for client in clients:
                client.close()
    attached = [c for c in captured if c["event"] == "trainer attached" and c["run"] == "run-flood"]
    assert 20 <= len(attached) <= 25, len(attached)
    assert [c["generation"] for c in attached[:20]] == list(range(1, 21))
    summaries = [c for c in captured if c["event"] == "log lines suppressed" and c.get("kind") == "attach"]
    assert summaries, captured  # one, or two on a machine so slow that a tick's summary was due before ours
    assert {(s["run"], s["rank"]) for s in summaries} == {("run-flood", 0)}
    assert sum(s["num_suppressed"] for s in summaries) == 40 - len(attached)
