"""The decision log's pure parts: which entries give which lines, the rate limiter, the hold-until-durable rule;
the notify URL's validation and redaction; the notify settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import structlog

from governor_daemon import metrics, notify, settings
from governor_daemon.decision_log import DecisionLog, Line, LineLimiter, describe, is_notable

COMMAND = {
    "command_id": 3,
    "kind": "rollback",
    "reason": "non-finite: validation loss nan",
    "punishment_reward": -10.0,
    "recovery_skip_batches": 0,
    "recovery_lr_scale": 1.0,
    "timeline": 0,
    "step": 130,
    "onset_step": 130,
    "recovery_rung": 0,
    "restore_before_step": None,
    "skip_through_step": None,
}
DECISION = {"verdict": "panic", "rule": "non_finite", "step": 130, "command": COMMAND}


def _entries() -> list[tuple[int, str, str, dict[str, Any]]]:
    return [
        (17, "r", "decision", {"seq": 14, "decision": DECISION}),
        (18, "r", "command", {"cause": "decision", "command": COMMAND}),
    ]


def test_a_decision_that_orders_a_rollback_gives_one_command_line_with_its_rule() -> None:
    """The DECISION entry gives no line of its own; the COMMAND line carries its rule and verdict, and notifies."""
    (line,) = describe(_entries())
    assert (line.seq, line.run, line.kind, line.level, line.message, line.notify) == (
        18,
        "r",
        "command",
        "warning",
        "command issued",
        "rollback",
    )
    assert line.fields["rule"] == "non_finite"
    assert line.fields["command"] == "ROLLBACK"
    assert line.fields["reason"] == COMMAND["reason"]


def test_a_controller_resume_is_info_and_not_notified() -> None:
    """RESUME from a controller: an info line without a rule, no notification."""
    resume = {**COMMAND, "kind": "resume", "reason": "resumed by controller: ok"}
    (line,) = describe([(5, "r", "command", {"cause": "controller", "command": resume})])
    assert (line.level, line.notify, "rule" in line.fields) == ("info", None, False)


def test_verdicts_without_commands_and_train_batches_give_no_line() -> None:
    """Ordinary traffic (healthy verdicts, vitals) is not notable: the log does not grow with every step."""
    healthy = {"verdict": "healthy", "rule": "none", "step": 10, "command": None}
    assert not is_notable("decision", {"decision": healthy})
    assert not is_notable("vitals", {"num_records": 64})
    assert is_notable("vitals", {"decision": DECISION})
    assert describe([(1, "r", "decision", {"decision": healthy}), (2, "r", "vitals", {"num_records": 4})]) == []


def test_lines_are_held_until_their_entries_are_durable() -> None:
    """Nothing is logged for an entry the journal could still lose; at release, lines come out in seq order."""
    log = DecisionLog()
    log.hold(_entries())
    log.hold([(19, "r", "detach", {"rank": 0, "generation": 1})])
    with structlog.testing.capture_logs() as captured:
        log.release(17, now=0.0)
        assert captured == []
        log.release(19, now=0.0)
    assert [(c["event"], c["seq"]) for c in captured] == [("command issued", 18), ("trainer detached", 19)]
    assert captured[1]["rank"] == 0


def test_an_entry_that_cannot_be_described_is_logged_as_a_bug_and_skipped() -> None:
    """A payload without its fields (a bug) never fails the event that appended it."""
    log = DecisionLog()
    with structlog.testing.capture_logs() as captured:
        log.hold([(1, "r", "attach", {})])
        log.release(1, now=0.0)
    assert [c["event"] for c in captured] == ["decision log: entries not described"]


def test_limiter_suppresses_a_flood_and_summarises_it() -> None:
    """A reconnect loop: the key's burst passes, the rest is counted; one summary per interval names the key."""
    limiter = LineLimiter(burst=3, refill_per_s=0.1, summary_interval_s=10.0)
    admitted = [limiter.admit("r", 0, "attach", now=0.0) for _ in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert limiter.admit("other", 0, "attach", now=0.0), "another run has its own bucket"
    assert limiter.summaries(now=5.0) == [], "not due yet"
    (summary,) = limiter.summaries(now=10.0)
    assert summary == {"run": "r", "rank": 0, "kind": "attach", "num_suppressed": 7, "window_s": 10.0}
    assert limiter.admit("r", 0, "attach", now=10.0), "one token came back in 10 s"
    assert limiter.summaries(now=20.0) == []


def test_limiter_daemon_bucket_caps_many_runs() -> None:
    """Many runs each within their own burst still meet the daemon-wide bucket."""
    limiter = LineLimiter(burst=5, daemon_burst=10, daemon_refill_per_s=0.0)
    admitted = sum(limiter.admit(f"run-{i}", None, "run_created", now=0.0) for i in range(50))
    assert admitted == 10


def test_a_reconnect_flood_of_one_run_does_not_silence_another_runs_halt() -> None:
    """One hostile trainer with many ranks (world_size up to 4096) reconnecting in a loop spends its own kinds'
    daemon-wide budget, not the budget of another run's HALT line (and its notification)."""
    limiter = LineLimiter()
    for rank in range(4096):
        limiter.admit("noisy", rank, "attach", now=0.0)
        limiter.admit("noisy", rank, "detach", now=0.0)
    assert not limiter.admit("noisy", 4095, "attach", now=0.0), "the flood is limited"
    assert limiter.admit("victim", None, "command", now=0.0), "another run's command line is still written"


def test_limiter_keys_are_bounded() -> None:
    """Beyond max_keys busy keys, new runs share one key per kind (run "*"), so memory stays bounded."""
    limiter = LineLimiter(burst=1, refill_per_s=0.0, max_keys=4, daemon_burst=1e9)
    for i in range(4):
        limiter.admit(f"run-{i}", None, "attach", now=0.0)
        limiter.admit(f"run-{i}", None, "attach", now=0.0)  # empty and owing a summary: kept
    assert limiter.admit("run-new", None, "attach", now=0.0)
    assert not limiter.admit("run-newer", None, "attach", now=0.0), "shares the '*' key's bucket"
    assert len(limiter._keys) == 5


def test_a_full_key_table_is_scanned_at_most_once_a_second() -> None:
    """With every key busy (a hostile run's thousands of ranks), each new key's line would scan the whole table
    for keys to forget (about 1 ms for 4096 keys, on the event loop); it is scanned once a second at most,
    and new keys share the '*' key meanwhile."""

    class Counting(LineLimiter):
        scans = 0

        def _prune(self, now: float) -> None:
            self.scans += 1
            super()._prune(now)

    limiter = Counting(burst=1, refill_per_s=0.0, max_keys=4, daemon_burst=1e9)
    for i in range(4):
        limiter.admit(f"run-{i}", None, "attach", now=0.0)
        limiter.admit(f"run-{i}", None, "attach", now=0.0)  # empty and owing a summary: kept
    for i in range(100):
        limiter.admit(f"new-{i}", None, "attach", now=0.5)
    assert limiter.scans == 1
    limiter.admit("newer", None, "attach", now=1.6)
    assert limiter.scans == 2


def test_decision_log_summary_line_is_logged() -> None:
    """The summary is a warning line 'log lines suppressed' with the count."""
    log = DecisionLog(LineLimiter(burst=1, refill_per_s=0.0, summary_interval_s=1.0))
    with structlog.testing.capture_logs() as captured:
        for seq in range(1, 6):
            attach = {"rank": 0, "generation": seq, "new_incarnation": False, "last_durable_seq": 0}
            log.hold([(seq, "r", "attach", attach)])
            log.release(seq, now=0.0)
        log.flush(now=2.0)
    events = [c["event"] for c in captured]
    assert events == ["trainer attached", "log lines suppressed"]
    assert captured[1]["num_suppressed"] == 4


def test_a_missed_rank_deadline_notifies_new_stalls_only() -> None:
    """Every step decided without rank 1 logs a line; only the first notifies (rank 1 is already STALLED)."""
    sent: list[dict[str, Any]] = []
    log = DecisionLog(notify=sent.append)
    deadline = {"step": 10, "timeline": 0, "missing_ranks": [1], "rank_deadline_s": 0.3}
    with structlog.testing.capture_logs() as captured:
        for seq in (5, 6):
            log.hold([(seq, "r", "rank_deadline", dict(deadline))])
            log.release(seq, now=0.0)
        log.hold([(7, "r", "stall_cleared", {"rank": 1, "timeline": 0, "step": 20})])
        log.hold([(8, "r", "rank_deadline", dict(deadline))])
        log.release(8, now=0.0)
    assert [c["event"] for c in captured].count("rank deadline missed") == 3
    assert [e["event"] for e in sent] == ["stalled", "stalled"], "again after rank 1 made progress"
    assert "ranks [1] of run r STALLED" in sent[0]["text"]


def test_notify_url_validation() -> None:
    """Only absolute http(s) URLs with a host; the messages never contain the URL's path."""
    assert notify.check_url("https://hooks.slack.com/services/T/B/x") == "https://hooks.slack.com/services/T/B/x"
    for bad, fragment in [
        ("ftp://host/secret", "must start with http:// or https://"),
        ("hooks.slack.com/secret", "must start with http:// or https://"),
        ("https:///secret", "has no host"),
        ("https://host:99999/secret", "not a valid URL"),
        ("https://host/se cret", "whitespace"),
    ]:
        with pytest.raises(notify.NotifyUrlError) as info:
            notify.check_url(bad)
        assert fragment in str(info.value)
        assert "secret" not in str(info.value)


def test_redacted_url_keeps_scheme_and_host_only() -> None:
    """Logs show where notifications go, never the token in the path, query or user part."""
    assert notify.redact_url("https://hooks.slack.com/services/T0/B0/XYZ") == "https://hooks.slack.com/…"
    assert notify.redact_url("http://user:pw@10.0.0.1:8080/x?token=y") == "http://10.0.0.1:8080/…"
    assert notify.redact_url("http://[::1]:9/") == "http://[::1]:9/"


def test_slack_text_is_escaped() -> None:
    """A reason from a trainer cannot mention a channel (<!channel>) or break Slack's markup."""
    line = Line(1, "r", "command", None, "warning", "command issued", {"reason": "<!channel> & co", "step": 1}, "halt")
    event = notify.line_event(line)
    assert "&lt;!channel&gt; &amp; co" in event["text"]
    assert event["reason"] == "<!channel> & co", "the raw reason stays in its own field"


def test_slack_text_stays_one_line() -> None:
    """A controller's HALT reason with a newline (or a terminal escape) cannot add a forged second line, such
    as a fake ROLLBACK of another run, to the text people read; the raw reason keeps its own field."""
    forged = "ok\nTolaria Governor on gpu-1: ROLLBACK of run other\u2028\x1b[2J"
    line = Line(1, "r", "command", None, "warning", "command issued", {"reason": forged, "step": 1}, "halt")
    event = notify.line_event(line)
    for unsafe in ("\n", "\u2028", "\x1b"):
        assert unsafe not in event["text"], event
    assert "ok\\x0aTolaria Governor on gpu-1" in event["text"]
    assert event["reason"] == forged


def test_metric_outcomes_match_the_notifier() -> None:
    """governor_notifications_total has a series for each outcome the notifier reports."""
    assert metrics.NOTIFICATION_OUTCOMES == notify.OUTCOMES
    m = metrics.Metrics()
    assert [m.value("governor_notifications_total", outcome=o) for o in notify.OUTCOMES] == [0.0] * 4


def _resolve(argv: list[str], env: dict[str, str], tmp_path: Path) -> settings.ServeSettings:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    return settings.resolve(parser.parse_args(["--data-dir", str(tmp_path), *argv]), env=env)


def test_notify_settings_from_flag_env_and_file(tmp_path: Path) -> None:
    """--notify-url, GOVERNOR_NOTIFY_URL and the TOML key notify_url all set it; the default is off."""
    assert _resolve([], {}, tmp_path).notify_url == ""
    assert _resolve(["--notify-url", "http://a/x"], {}, tmp_path).notify_url == "http://a/x"
    assert _resolve([], {"GOVERNOR_NOTIFY_URL": "https://b/y"}, tmp_path).notify_url == "https://b/y"
    config = tmp_path / "g.toml"
    config.write_text('notify_url = "https://c/z"\nnotify_max_queued = 5\n')
    resolved = _resolve(["--config", str(config)], {}, tmp_path)
    assert (resolved.notify_url, resolved.notify_max_queued, resolved.notify_timeout_s) == ("https://c/z", 5, 5.0)


def test_bad_notify_settings_are_refused(tmp_path: Path) -> None:
    """A bad scheme names the source and hides the URL; bounds on the timeout and the queue."""
    with pytest.raises(settings.SettingsError) as info:
        _resolve([], {"GOVERNOR_NOTIFY_URL": "file:///etc/secret"}, tmp_path)
    assert "GOVERNOR_NOTIFY_URL" in str(info.value)
    assert "secret" not in str(info.value)
    with pytest.raises(settings.SettingsError, match="notify_max_queued"):
        _resolve(["--notify-max-queued", "0"], {}, tmp_path)
    with pytest.raises(settings.SettingsError, match="notify_timeout_s"):
        _resolve(["--notify-timeout-s", "0"], {}, tmp_path)
