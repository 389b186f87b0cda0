"""Notifications: a JSON event POSTed to ``--notify-url`` on ROLLBACK, HALT, STALLED and journal failure.

The event (``line_event``, ``journal_failure_event``) carries ``event`` (rollback, halt, stalled,
journal_failed), ``run``, ``rank``, ``seq`` (the journal entry), ``reason``, ``host``, ``time``, the log
line's fields under ``details``, and a one-line ``text`` for people (control characters escaped as
``governor_daemon.text.printable`` does), escaped as Slack wants it: a Slack incoming webhook URL works as
it is (Slack reads ``text``, the other fields are for other receivers).

``Notifier`` delivers from one worker thread, so neither the event loop nor the core ever waits on the
network: ``submit`` appends to a bounded queue (full: the oldest event of the lowest ``PRIORITY`` is dropped and
counted) and
returns. The worker POSTs each event with a per-attempt timeout and retries a refused connection, a
timeout, a 5xx, 408 or 429 with exponential backoff (``BACKOFF_S`` doubling up to ``MAX_BACKOFF_S``,
``MAX_ATTEMPTS`` attempts); any other answer is final. Redirects are not followed. A ``user:password@``
in the URL is sent as HTTP basic auth (urllib would take it for part of the host name). ``close`` gives
the queue ``DRAIN_S`` to empty; what is left then is dropped and counted. Delivery is at most once: the
queue lives in memory, and a restarted daemon does not notify again what its journal already held.

The URL is a secret (a Slack webhook URL is its own credential): it is validated at start-up and only
``redact_url``'s form (scheme, host, port) is ever logged.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from governor_daemon.text import printable

log = structlog.get_logger("governor.notify")

DEFAULT_MAX_QUEUED = 1000
DEFAULT_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 6
BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
"""Retries after 0.5, 1, 2, 4, 8 s (each +-20 %): a receiver down for about 15 s loses nothing."""
DRAIN_S = 5.0
"""At shutdown, how long queued events still get."""
DROP_LOG_INTERVAL_S = 10.0
MAX_TEXT_CHARS = 3000
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
PRIORITY = {"stalled": 0, "rollback": 1, "halt": 2, "journal_failed": 2}
"""What a full queue keeps: it drops the oldest event of the lowest priority (a rank stalls again and
again; a HALT waits for a person)."""

OUTCOMES = ("sent", "retried", "failed", "dropped")
"""``on_outcome`` values: delivered; an attempt failed and will be retried; given up; dropped unsent."""


class NotifyUrlError(ValueError):
    """The notify URL is unusable; the message names the fix and never the URL's secret parts."""


def check_url(url: str) -> str:
    """The URL if it is an absolute http(s) URL with a host; raises NotifyUrlError."""
    if any(c.isspace() for c in url):
        raise NotifyUrlError("notify_url contains whitespace; give the URL alone")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise NotifyUrlError(f"notify_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        shown = parts.scheme or "none"
        raise NotifyUrlError(f"notify_url must start with http:// or https://, got scheme {shown!r}")
    if not parts.hostname:
        raise NotifyUrlError(f"notify_url has no host: expected {parts.scheme}://HOST[:PORT]/PATH")
    return url


def redact_url(url: str) -> str:
    """The URL without what may be secret (user, password, path, query): ``https://hooks.slack.com/…``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid URL)"
    host = f"[{host}]" if ":" in host else host
    hidden = "/…" if (parts.path not in ("", "/") or parts.query or parts.fragment or parts.username) else "/"
    return f"{parts.scheme}://{host}{port}{hidden}"


def slack_escape(text: str) -> str:
    """``&``, ``<`` and ``>`` escaped as Slack's text requires (so a reason cannot ping a channel)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _event(
    name: str, text: str, run: str, rank: int | None, seq: int | None, reason: str, details: dict[str, Any]
) -> dict[str, Any]:
    host = socket.gethostname()
    full = printable(f"Tolaria Governor on {host}: {text}")  # one line: a newline in a reason forges none
    if len(full) > MAX_TEXT_CHARS:
        full = full[: MAX_TEXT_CHARS - 1] + "…"
    return {
        "source": "tolaria-governor",
        "event": name,
        "text": slack_escape(full),
        "run": run,
        "rank": rank,
        "seq": seq,
        "reason": reason,
        "host": host,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "details": details,
    }


class Line(Protocol):
    """What a notification reads of a decision-log line (``decision_log.Line``; this module does not import it)."""

    @property
    def seq(self) -> int: ...

    @property
    def run(self) -> str: ...

    @property
    def rank(self) -> int | None: ...

    @property
    def fields(self) -> dict[str, Any]: ...

    @property
    def notify(self) -> str | None: ...


def line_event(line: Line) -> dict[str, Any]:
    """The notification of a log line whose ``notify`` is set (rollback, halt, stalled)."""
    f = line.fields
    reason = str(f.get("reason", ""))
    if line.notify == "stalled" and line.rank is None:  # a missed rank deadline
        text = f"ranks {f.get('missing_ranks')} of run {line.run} STALLED: {reason}"
    elif line.notify == "stalled":
        text = f"rank {line.rank} of run {line.run} STALLED: {reason} (latest step {f.get('latest_step')})"
    elif line.notify == "halt":
        text = (
            f"HALT of run {line.run} (command {f.get('command_id')}): {reason}. "
            f"The run waits for `governor resume {line.run}`."
        )
    else:
        rule = f" rule {f['rule']}," if "rule" in f else ""
        text = f"ROLLBACK of run {line.run} (command {f.get('command_id')},{rule} step {f.get('step')}): {reason}"
    return _event(str(line.notify), text, line.run, line.rank, line.seq, reason, dict(f))


def journal_failure_event(error: str, data_dir: str) -> dict[str, Any]:
    """The notification of a journal write failure (the daemon stops and exits 8)."""
    text = (
        f"journal write failed in {data_dir}: {error}. The daemon acknowledges nothing more and exits 8; "
        "restart it once the disk is fixed (it recovers from the journal)."
    )
    return _event("journal_failed", text, "", None, None, error, {"data_dir": data_dir})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a webhook that redirects is misconfigured; the 3xx is the final answer


class Notifier:
    """POSTs events from a worker thread. ``submit`` and ``close`` may be called from any thread.

    ``on_outcome(outcome, n)`` is called (on the calling or the worker thread) for ``n`` events sent, attempts
    retried, events failed or events dropped; ``counts`` holds the same totals and ``wait_for`` waits on them.
    """

    def __init__(
        self,
        url: str,
        max_queued: int = DEFAULT_MAX_QUEUED,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        on_outcome: Callable[[str, int], None] | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.url = check_url(url)
        self.shown_url = redact_url(url)
        self._target, self._headers = _target_and_headers(url)
        self.max_queued, self.timeout_s = max_queued, timeout_s
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.on_outcome = on_outcome
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._deadline: float | None = None
        self._drops_unlogged = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL_S
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._thread = threading.Thread(target=self._run, name="governor-notify", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- any thread

    def submit(self, event: dict[str, Any]) -> None:
        """Queue an event; never blocks on the network. A full queue drops the oldest event of the lowest
        ``PRIORITY`` (the new one included): a flood of STALLED never pushes out a HALT."""
        with self._cond:
            if self._closing.is_set():
                return
            self._queue.append(event)
            dropped = None
            if len(self._queue) > self.max_queued:
                lowest = min(PRIORITY.get(e["event"], 0) for e in self._queue)
                dropped = next(e for e in self._queue if PRIORITY.get(e["event"], 0) == lowest)
                self._queue.remove(dropped)
            if dropped is not event:
                self._cond.notify()
        if dropped is not None:
            self._dropped(1, "queue full: the oldest event of the lowest priority was dropped")

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Stop accepting events; give the queue ``drain_s`` to empty (blocks the caller that long at most,
        plus one attempt's timeout); drop what is left."""
        with self._cond:
            self._deadline = time.monotonic() + drain_s
            self._closing.set()
            self._cond.notify_all()
        self._thread.join(drain_s + self.timeout_s + 1.0)
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self._dropped(left, "not delivered before shutdown")
        self._log_drops("dropped earlier: the queue was full", force=True)

    def wait_for(self, predicate: Callable[[dict[str, int]], bool], timeout_s: float = 10.0) -> bool:
        """Wait until ``predicate(counts)`` holds (tests, tools); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.counts), timeout_s)

    # ----------------------------------------------------------------- worker thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing.is_set():
                    self._cond.wait()
                if not self._queue or self._past_deadline():
                    return
                event = self._queue.popleft()
            try:
                self._deliver(event)
            except Exception:  # a bug must not end the worker: later events still go out
                self._count("failed")
                log.exception("notification not delivered", notify_url=self.shown_url, notification=event.get("event"))

    def _deliver(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, allow_nan=False, default=str).encode()
        delay = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            error, retry, retry_after = self._post(body)
            if error is None:
                self._count("sent")
                return
            if not retry or attempt == self.max_attempts or not self._sleep(max(delay, retry_after)):
                self._count("failed")
                log.warning(
                    "notification not delivered",
                    notify_url=self.shown_url,
                    notification=event.get("event"),
                    run=event.get("run"),
                    seq=event.get("seq"),
                    attempts=attempt,
                    error=error,
                )
                return
            self._count("retried")
            delay = min(delay * 2, MAX_BACKOFF_S)

    def _post(self, body: bytes) -> tuple[str | None, bool, float]:
        """One attempt: (error or None, whether to retry, the receiver's Retry-After in seconds)."""
        request = urllib.request.Request(self._target, data=body, method="POST", headers=self._headers)
        timeout = self.timeout_s
        if self._deadline is not None:
            timeout = max(0.1, min(timeout, self._deadline - time.monotonic()))
        try:
            with self._opener.open(request, timeout=timeout) as response:
                response.read(65536)
            return None, False, 0.0
        except urllib.error.HTTPError as exc:
            retry_after = _seconds(exc.headers.get("Retry-After")) if exc.headers else 0.0
            return f"HTTP {exc.code} {exc.reason}", exc.code in RETRY_STATUSES, retry_after
        except urllib.error.URLError as exc:
            return _describe(exc.reason), True, 0.0
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a malformed answer
            return _describe(exc), True, 0.0

    def _sleep(self, delay_s: float) -> bool:
        """Wait before a retry (+-20 % jitter); False if the shutdown drain ends first."""
        end = time.monotonic() + min(delay_s, MAX_BACKOFF_S) * random.uniform(0.8, 1.2)
        while (now := time.monotonic()) < end:
            if self._deadline is not None:
                if end > self._deadline:
                    return False
                time.sleep(end - now)
                return True
            self._closing.wait(end - now)  # close() wakes it to check against the drain deadline
        return True

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._cond:
            self.counts[outcome] += n
            self._cond.notify_all()
        if self.on_outcome is not None:
            self.on_outcome(outcome, n)

    def _dropped(self, n: int, why: str) -> None:
        self._count("dropped", n)
        with self._cond:
            self._drops_unlogged += n
        self._log_drops(why)

    def _log_drops(self, why: str, force: bool = False) -> None:
        """At most one line per DROP_LOG_INTERVAL_S (``force``: now), with the drops since the last one."""
        now = time.monotonic()
        with self._cond:
            if not self._drops_unlogged or not (force or now - self._drop_logged_at >= DROP_LOG_INTERVAL_S):
                return
            num, self._drops_unlogged, self._drop_logged_at = self._drops_unlogged, 0, now
        log.warning(
            "notifications dropped",
            reason=why,
            num_dropped=num,
            max_queued=self.max_queued,
            notify_url=self.shown_url,
        )


def _target_and_headers(url: str) -> tuple[str, dict[str, str]]:
    """The URL to POST to and the request's headers: a ``user:password@`` becomes basic auth."""
    headers = {"Content-Type": "application/json", "User-Agent": "tolaria-governor"}
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, headers
    user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
    headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), headers


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: the backoff applies


def _describe(reason: object) -> str:
    """An error as text without the URL (urllib's errors name the host at most)."""
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
