"""`governor serve` as a subprocess of its own, for tests, benchmarks and the demo.

    with DaemonProcess(data_dir) as daemon:        # test settings: 50 ms ticks, metrics off
        ...daemon.address...
    with DaemonProcess(data_dir, tick_interval_s=None, metrics_listen=f"127.0.0.1:{free_port()}") as daemon:
        ...                                        # the daemon's own defaults, metrics served

It always listens on a free loopback port (reported through ``--port-file``) and logs to
``<data_dir>.log`` next to the data directory. Leaving the ``with`` block stops a daemon that is still
running with SIGTERM (``terminate``); ``kill`` is SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

# What tests want: deadlines checked every 50 ms, and no metrics port to collide on.
TEST_TICK_INTERVAL_S = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DaemonProcess:
    """`governor serve` as a subprocess (so it can be SIGKILLed).

    ``tick_interval_s`` and ``metrics_listen`` default to the test settings; None leaves the daemon's own
    default (0.25 s ticks; metrics on 127.0.0.1 at a free port, as --listen has port 0: ``metrics_port()``),
    as `governor serve` runs for users.
    ``extra_args`` are more `governor serve` flags; ``max_file_bytes`` sets RLIMIT_FSIZE (a full disk).
    """

    def __init__(
        self,
        data_dir: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        max_file_bytes: int | None = None,
        tick_interval_s: float | None = TEST_TICK_INTERVAL_S,
        metrics_listen: str | None = "off",
    ) -> None:
        self.data_dir = data_dir
        self.metrics_listen = metrics_listen
        self.port_file = data_dir.parent / f"{data_dir.name}.port"
        self.port_file.unlink(missing_ok=True)
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()  # the log is appended to: this process's lines start here
        args = [
            sys.executable,
            "-m",
            "governor_daemon",  # not .cli.main: runpy warns on stderr (the log) when a package has imported it
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--port-file",
            str(self.port_file),
        ]
        if metrics_listen is not None:
            args += ["--metrics-listen", metrics_listen]
        if tick_interval_s is not None:
            args += ["--tick-interval-s", str(tick_interval_s)]
        args += extra_args

        def limit_file_size() -> None:  # a full disk, as the process sees it: writes past the limit fail (EFBIG)
            if max_file_bytes is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=limit_file_size if max_file_bytes is not None else None,
        )
        try:
            self.port = self._wait_port()
        except BaseException:
            self._stop_quietly()
            raise

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            if exc is None:
                self.terminate()  # a daemon that does not stop cleanly fails the block
            else:
                self._stop_quietly()  # the block's own exception is the one to see
        elif not self._log.closed:
            self._log.close()

    def _stop_quietly(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                self.terminate()
        if not self._log.closed:
            self._log.close()

    def _wait_port(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.port_file.exists() and self.port_file.read_text().strip():
                return int(self.port_file.read_text())
            if self.proc.poll() is not None:
                raise RuntimeError(f"governor serve exited with {self.proc.returncode}: {self.log_path.read_text()}")
            time.sleep(0.02)
        raise TimeoutError(f"governor serve did not start in {timeout_s} s: {self.log_path.read_text()}")

    @property
    def address(self) -> str:
        """host:port of the gRPC server."""
        return f"127.0.0.1:{self.port}"

    def metrics_port(self, timeout_s: float = 30.0) -> int | None:
        """The metrics port on the daemon's "governor serving" log line (None: metrics off)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                lines = log.read().decode(errors="replace").splitlines()
            for line in lines:
                if '"governor serving"' in line:
                    port = json.loads(line).get("metrics_port")
                    return None if port is None else int(port)
            if self.proc.poll() is not None:
                raise RuntimeError(f"governor serve exited with {self.proc.returncode}: {self.log_path.read_text()}")
            time.sleep(0.02)
        raise TimeoutError(f"no 'governor serving' line in {timeout_s} s: {self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code. A daemon that does not stop in time gets SIGQUIT (its
        stacks go to the log), then SIGKILL, and the error carries the log's tail."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGQUIT)
            time.sleep(1.0)
            self.proc.kill()
            self.proc.wait(10)
            self._log.close()
            tail = self.log_path.read_text(errors="replace")[-6000:]
            raise TimeoutError(
                f"governor serve did not stop within {timeout_s} s after SIGTERM; log tail:\n{tail}"
            ) from None
        self._log.close()
        return code
