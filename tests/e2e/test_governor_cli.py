"""The people-facing CLI as subprocesses against a real daemon: status, runs, watch, commands, policy, audit."""

from __future__ import annotations

import json
import math
from pathlib import Path

from governor_daemon.daemon_process import DaemonProcess
from governor_daemon.testing import AttachClient
from tests.conftest import governor_cli
from tests.integration.conftest import warm_up


def test_cli_against_a_daemon(tmp_path: Path) -> None:
    """Every client command works as a user runs it, with tables and --json."""
    daemon = DaemonProcess(tmp_path / "data")
    address = ["--address", daemon.address]
    client = AttachClient(daemon.address, "cli-run")
    client.connect()
    step = warm_up(client)
    client.validation(step + 10, math.nan)
    client.result(client.next("command").command)
    client.wait_ack(client.seq)

    table = governor_cli(["runs", *address])
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["run", "state", "tl"]
    assert "cli-run" in table.stdout
    status = json.loads(governor_cli(["status", "cli-run", *address, "--json"]).stdout)
    assert (status["state"], status["timeline"], status["num_rollbacks"]) == ("healthy", 1, 1)
    human = governor_cli(["status", "cli-run", *address]).stdout
    assert "timeline 1, rollbacks 1" in human

    policy = governor_cli(["policy", "set", "cli-run", "sensitivity=4.5", "death_penalty=2", *address, "--json"])
    assert policy.returncode == 0, policy.stderr
    assert json.loads(policy.stdout)["sensitivity"] == 4.5
    assert "death_penalty" in governor_cli(["policy", "get", "cli-run", *address]).stdout
    bad = governor_cli(["policy", "set", "cli-run", "colour=red", *address])
    assert bad.returncode == 2
    assert "unknown policy field" in bad.stderr

    rollback = governor_cli(["rollback", "cli-run", "--reason", "operator saw bad data", *address, "--json"])
    assert rollback.returncode == 0, rollback.stderr
    command = client.next("command").command
    assert command.command_id == json.loads(rollback.stdout)["command_id"]
    assert "operator saw bad data" in command.reason
    client.result(command)
    client.wait_ack(client.seq)
    assert governor_cli(["halt", "cli-run", *address]).returncode == 0
    client.result(client.next("command").command)
    assert governor_cli(["resume", "cli-run", *address]).returncode == 0
    client.result(client.next("command").command)
    client.wait_ack(client.seq)
    assert governor_cli(["resume", "cli-run", *address]).returncode == 2  # not halted any more

    watched = governor_cli(["watch", *address, "--kind", "controller_request", "--limit", "3", "--json"])
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [e["payload"]["action"] for e in events] == ["rollback", "halt", "resume"]
    assert all(e["payload"]["caller"].startswith("anonymous@") for e in events)
    after = governor_cli(
        [
            "watch",
            *address,
            "--from",
            str(events[0]["cursor"]),
            "--kind",
            "controller_request",
            "--limit",
            "2",
            "--json",
        ]
    )
    assert [json.loads(line)["cursor"] for line in after.stdout.splitlines()] == [e["cursor"] for e in events[1:]]
    client.close()
    assert daemon.terminate() == 0

    data = ["--data-dir", str(tmp_path / "data")]
    show = governor_cli(["audit", "show", *data, "--run", "cli-run", "--kind", "decision"])
    assert show.returncode == 0
    assert "PANIC -> rollback (command 1) reward -10: non-finite: validation loss nan" in show.stdout
    assert governor_cli(["audit", "show", *data, "--since", "not-a-time"]).returncode == 2
    head = governor_cli(["audit", "head", *data, "--json"])
    last = json.loads(governor_cli(["audit", "show", *data, "--json"]).stdout.splitlines()[-1])
    assert json.loads(head.stdout)["hash"] == last["hash"]
    png = tmp_path / "plot.png"
    plotted = governor_cli(["audit", "plot", "cli-run", *data, "-o", str(png)])
    assert plotted.returncode == 0, plotted.stderr
    import matplotlib.image

    image = matplotlib.image.imread(str(png))
    assert image.shape[0] >= 400
    assert image.shape[1] >= 800
    assert governor_cli(["audit", "plot", "no-such-run", *data, "-o", str(tmp_path / "x.png")]).returncode == 2
    unreachable = governor_cli(["runs", "--address", "127.0.0.1:1", "--timeout-s", "2"])
    assert unreachable.returncode == 4
