"""A real HTTP server that receives notifications (http.server on a loopback port, in a thread).

Tests wait on it (``wait_for``), never sleep: every POST body is kept and wakes the waiters.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """POSTs to any path are answered ``status`` (200) and kept in ``events``; with ``hang`` set, each
    request waits for ``release`` first (``entered`` is set when one arrives)."""

    def __init__(self, port: int = 0, status: int = 200, hang: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.authorizations: list[str | None] = []
        self.status, self.hang = status, hang
        self.entered = threading.Event()
        self.release = threading.Event()
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.entered.set()
                if receiver.hang:
                    receiver.release.wait(60)
                with receiver._cond:
                    receiver.events.append(json.loads(body))
                    receiver.paths.append(self.path)
                    receiver.authorizations.append(self.headers.get("Authorization"))
                    receiver._cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str = "/hooks/T000/B000/s3cr3t-token") -> str:
        """The URL to give --notify-url (its path stands for a webhook's secret)."""
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 20.0) -> bool:
        """Wait until ``predicate(events)`` holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.events), timeout_s)
