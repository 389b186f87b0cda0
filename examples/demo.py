"""`make demo`: a governed digits run with a seed lifecycle and two injected faults, told as a story.

Starts `governor serve` as users run it (its default tick interval and settings, Prometheus metrics
served, here on a free port) with a fresh data directory, runs `tolaria-train`, narrates what happens
from the trainer's JSON events, then shows the daemon's metrics, `governor audit show` and `governor
audit verify`, and writes the run's plot to a PNG. The daemon it started is stopped on success, failure
and Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from governor_daemon.daemon_process import DaemonProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "demo-output"
SCHEDULE = "germinate:residual@3,blend@5,fossilize@8,slot1/germinate:lowrank@11,slot1/blend@14"
FAULTS = ["nan@epoch=12", "lobotomy@epoch=16"]


def governor(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "governor_daemon", *args], text=True, capture_output=True, check=check)


def say(text: str = "") -> None:
    print(text, flush=True)


def narrate(event: dict[str, Any]) -> None:
    name = event.get("event", "")
    if name == "epoch":
        seeds = ", ".join(f"{k}={v}" for k, v in event["seeds"].items() if v != "DORMANT") or "no seeds"
        say(
            f"  epoch {event['epoch']:>2}  step {event['step']:>4}  timeline {event['timeline']}  "
            f"val loss {event['val_loss']:8.4f}  acc {event['val_accuracy']:.3f}  [{event['mode']:7}]  {seeds}"
        )
    elif name == "seed lifecycle":
        say(f"  >> seed lifecycle: {event['slot']} {event['action']} -> {event['stage']}")
    elif name == "fault injected":
        say(f"  !! fault injected: {event['fault']}")
    elif name == "governor verdict PANIC":
        say(f"  !! governor verdict PANIC at step {event['step']}: {event['reason']}")
    elif name == "command":
        say(
            f"  !! governor orders {event['type'].removeprefix('COMMAND_TYPE_')} (command {event['command_id']}), "
            f"punishment reward {event['punishment_reward']:g}: {event['reason']}"
        )
    elif name == "restored":
        culled = ", ".join(event["culled"]) or "none"
        say(
            f"  << restored the last-known-good snapshot of step {event['restored_step']} in "
            f"{event['duration_ms']:.1f} ms; timeline -> {event['timeline']}; live seeds culled: {culled}"
        )
    elif name == "seed-schedule entry skipped":
        say(f"  -- schedule entry skipped: {event['slot']} {event['action']} ({event['reason']})")


METRICS_SHOWN = ("governor_verdicts_total", "governor_panics_total", "governor_commands_total")


def show_metrics(url: str) -> None:
    """The daemon's counters of verdicts, panics and commands, as Prometheus scrapes them."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        say(f"  (metrics not readable: {exc})")
        return
    for line in text.splitlines():
        if line.startswith(METRICS_SHOWN):
            say("  " + line)


def main() -> int:
    OUTPUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tolaria-demo-"))
    data_dir = work / "data"
    run_id = f"digits-demo-{uuid.uuid4().hex[:6]}"
    metrics = f"127.0.0.1:{free_port()}"
    try:
        # `governor serve` as a process of its own, with the daemon's own defaults (not the tests' 50 ms
        # tick and metrics off); only the ports are free ones, so that the demo never collides.
        daemon = DaemonProcess(data_dir, tick_interval_s=None, metrics_listen=metrics)
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"the governor did not start: {exc}") from None
    with daemon:
        return story(daemon, data_dir, run_id, metrics)


def story(daemon: DaemonProcess, data_dir: Path, run_id: str, metrics: str) -> int:
    trainer: subprocess.Popen[str] | None = None
    try:
        address = daemon.address
        say(f"== governor serving on {address} (metrics on http://{metrics}/metrics), journal in {data_dir}")
        say(f"== training run {run_id}: digits, 20 epochs, seed schedule {SCHEDULE}")
        say(f"== injected faults: {', '.join(FAULTS)}")
        cmd = [
            sys.executable,
            "-m",
            "tolaria_trainer",
            "--task",
            "digits",
            "--epochs",
            "20",
            "--run-id",
            run_id,
            "--address",
            address,
            "--seed-schedule",
            SCHEDULE,
            "--log-format",
            "json",
            "--agree-every-steps",
            "20",
        ]
        for fault in FAULTS:
            cmd += ["--inject", fault]
        trainer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert trainer.stdout is not None
        summary: dict[str, Any] = {}
        for line in trainer.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if line.startswith("tolaria-train:"):
                    say(f"== {line.strip()}")
                continue
            if "event" not in event:  # the last stdout line: the summary object (what --summary-json writes)
                summary = event
            elif event.get("logger") == "tolaria.cli":  # the trainer's own messages (the final one, warnings)
                say(f"== tolaria-train: {event['event']}")
            else:
                narrate(event)
        code = trainer.wait()
        say()
        say(
            f"== result: {summary.get('status')}, {summary.get('rollbacks')} rollback(s), timeline "
            f"{summary.get('timeline')}, final validation accuracy {summary.get('final_validation_accuracy', 0):.4f} "
            f"(exit code {code})"
        )
        say()
        say(f"== the governor's metrics (http://{metrics}/metrics):")
        show_metrics(f"http://{metrics}/metrics")
        say()
        say("== governor audit show (decisions that ordered something, command results, finish):")
        shown = governor(
            "audit",
            "show",
            "--data-dir",
            str(data_dir),
            "--run",
            run_id,
            "--kind",
            "vitals",
            "--kind",
            "decision",
            "--kind",
            "command_result",
            "--kind",
            "finish",
        )
        for row in shown.stdout.splitlines():
            ordered = " -> " in row and "-> none" not in row
            if ordered or " command_result " in row or " finish " in row:
                say("  " + row)
        say()
        say("== governor audit verify:")
        verify = governor("audit", "verify", "--data-dir", str(data_dir), check=False)
        say("  " + (verify.stdout or verify.stderr).strip())
        png = OUTPUT / f"{run_id}.png"
        governor("audit", "plot", run_id, "--data-dir", str(data_dir), "-o", str(png))
        say()
        say(f"== plot of the run written to {png}")
        return 0 if code == 0 and verify.returncode == 0 else 1
    except KeyboardInterrupt:
        say("\n== interrupted")
        return 130
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.terminate()
            trainer.wait(10)
        os.environ.pop("GOVERNOR_ADDRESS", None)


if __name__ == "__main__":
    sys.exit(main())
