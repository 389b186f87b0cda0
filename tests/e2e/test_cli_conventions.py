"""`governor` and `tolaria-train` fit together (issue 24, item 5), as processes against real daemons: one
spelling for the connection flags and their variables (the old ones still work, with one deprecation
warning), `--version`, one spelling of a run state, unknown `--kind` refused, an unreachable daemon named
with a hint, trainer stderr that is JSON only, and one shape for the summary."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from governor_daemon.daemon_process import DaemonProcess, free_port
from governor_daemon.testing import AttachClient
from tests.conftest import REPO, governor_cli
from tests.integration.conftest import warm_up
from tolaria import client_options

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CONNECTION_VARIABLES = frozenset(client_options.environment_variables(legacy=True))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any connection variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CONNECTION_VARIABLES}
    return {**env, **extra}


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses the bare NaN and Infinity Python's json would otherwise accept."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def trainer(*args: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """`tolaria-train --task synthetic --log-format json ARGS` to the end."""
    cmd = [sys.executable, "-m", "tolaria_trainer", "--task", "synthetic", "--log-format", "json", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout_s, env=env or clean_env(), check=False, cwd=REPO
    )


def test_both_clis_print_their_version() -> None:
    """`governor --version` and `tolaria-train --version` print the distribution's version (both were usage
    errors)."""
    governor = governor_cli(["--version"])
    assert (governor.returncode, governor.stdout.strip()) == (0, f"governor {VERSION}"), governor.stderr
    train = subprocess.run(
        [sys.executable, "-m", "tolaria_trainer", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert (train.returncode, train.stdout.strip()) == (0, f"tolaria-train {VERSION}"), train.stderr


def test_governor_takes_a_token_file_as_the_trainer_does(secured: tuple[DaemonProcess, Path]) -> None:
    """`governor --token-file` and GOVERNOR_TOKEN_FILE, the trainer's spelling (the CLI took the secret only
    on the command line); --token with --token-file is a usage error."""
    daemon, folder = secured
    token_file = str(folder / "controller.token")
    by_flag = governor_cli(["runs", "--address", daemon.address, "--token-file", token_file], env=clean_env())
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = governor_cli(["runs"], env=clean_env(GOVERNOR_ADDRESS=daemon.address, GOVERNOR_TOKEN_FILE=token_file))
    assert by_env.returncode == 0, by_env.stderr
    without = governor_cli(["runs", "--address", daemon.address], env=clean_env())
    assert without.returncode == 2, without.stderr
    assert "UNAUTHENTICATED" in without.stderr
    both = governor_cli(
        ["runs", "--address", daemon.address, "--token", "x", "--token-file", token_file], env=clean_env()
    )
    assert both.returncode == 2
    assert "--token and --token-file exclude each other" in both.stderr


def test_trainer_reads_the_governor_spelling_of_flags_and_variables(secured: tuple[DaemonProcess, Path]) -> None:
    """tolaria-train --address/--token-file, and GOVERNOR_ADDRESS/GOVERNOR_TOKEN_FILE alone, reach the daemon
    with no deprecation warning (the trainer knew only --governor and TOLARIA_*)."""
    daemon, folder = secured
    token_file = str(folder / "trainer.token")
    for args, env in (
        (["--address", daemon.address, "--token-file", token_file], clean_env()),
        ([], clean_env(GOVERNOR_ADDRESS=daemon.address, GOVERNOR_TOKEN_FILE=token_file)),
    ):
        result = trainer("--epochs", "1", *args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = strict_json(result.stdout.splitlines()[-1])
        assert (summary["governed"], summary["governor"]) == (True, daemon.address), summary
        assert "deprecated" not in result.stderr


def test_trainer_old_spellings_still_work_with_one_deprecation_warning(secured: tuple[DaemonProcess, Path]) -> None:
    """--governor, --data-dir and TOLARIA_TOKEN_FILE still work, and one warning line names all three with
    their new spellings."""
    daemon, folder = secured
    env = clean_env(TOLARIA_TOKEN_FILE=str(folder / "trainer.token"))
    result = trainer("--epochs", "1", "--governor", daemon.address, "--data-dir", str(folder), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert strict_json(result.stdout.splitlines()[-1])["governed"] is True
    warnings = [strict_json(line) for line in result.stderr.splitlines() if "deprecated" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "warning"
    for renamed in (
        "--governor is now --address",
        "--data-dir is now --dataset-dir",
        "TOLARIA_TOKEN_FILE is now GOVERNOR_TOKEN_FILE",
    ):
        assert renamed in warnings[0]["event"], warnings[0]


def test_a_flag_in_both_spellings_is_refused_before_training() -> None:
    """--address with --governor is a usage error naming both (no guessing which one was meant)."""
    result = trainer("--address", "127.0.0.1:1", "--governor", "127.0.0.1:2", timeout_s=120)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.splitlines()
    assert "--address and its deprecated spelling --governor both given" in strict_json(line)["event"]


def test_a_run_state_has_one_spelling(tmp_path: Path) -> None:
    """runs (table and --json), status (text and --json) and a command's receipt all say `rolling_back` /
    `healthy`, as `runs --state` takes them; not ROLLING_BACK in one place and RUN_STATE_ROLLING_BACK in
    another."""
    with DaemonProcess(tmp_path / "data") as daemon:
        address = ["--address", daemon.address]
        client = AttachClient(daemon.address, "state-run")
        client.connect()
        step = warm_up(client)
        client.validation(step + 10, math.nan)
        command = client.next("command").command  # unanswered: the run is rolling back
        client.wait_ack(client.seq)
        table = governor_cli(["runs", *address, "--state", "rolling_back"])
        listed = json.loads(governor_cli(["runs", *address, "--json"]).stdout)
        status = json.loads(governor_cli(["status", "state-run", *address, "--json"]).stdout)
        text = governor_cli(["status", "state-run", *address]).stdout
        client.result(command)
        client.wait_ack(client.seq)
        halt = governor_cli(["halt", "state-run", *address, "--json"])
        client.close()
    assert table.returncode == 0, table.stderr
    (row,) = table.stdout.splitlines()[1:]
    assert row.split()[:2] == ["state-run", "rolling_back"], row
    assert listed[0]["state"] == status["state"] == "rolling_back"
    assert status["last_verdict"] == "panic"
    assert status["open_command"]["type"] == "rollback"
    assert "state rolling_back," in text
    assert "open command 1 (rollback)" in text
    assert halt.returncode == 0, halt.stderr
    run_state = json.loads(halt.stdout)["run_state"]
    assert run_state in {"halted", "rolling_back"}, run_state
    for output in (table.stdout, json.dumps(listed), json.dumps(status), text, halt.stdout):
        assert "RUN_STATE_" not in output, output
        assert "ROLLING_BACK" not in output, output


@pytest.mark.parametrize("command", [["watch", "--address", "127.0.0.1:1"], ["audit", "show", "--data-dir", "."]])
def test_an_unknown_kind_is_refused_listing_the_kinds(command: list[str]) -> None:
    """`--kind bogus` is exit 2 naming the valid kinds (it matched nothing and exited 0)."""
    result = governor_cli([*command, "--kind", "decision", "--kind", "bogus"])
    assert result.returncode == 2, result.stderr
    assert "unknown entry kind 'bogus'" in result.stderr
    assert "decision, command, command_result" in result.stderr


@pytest.mark.parametrize(
    "command", [["runs"], ["status", "some-run"], ["halt", "some-run"], ["health"]], ids=lambda c: c[0]
)
def test_an_unreachable_daemon_is_one_line_with_a_hint(command: list[str]) -> None:
    """No daemon at the address: exit 4 and one line naming the address, asking whether `governor serve` runs
    there and what TLS to check (it was gRPC's raw 'failed to connect to all addresses' text)."""
    address = f"127.0.0.1:{free_port()}"
    result = governor_cli([*command, "--address", address, "--timeout-s", "5"], env=clean_env())
    assert result.returncode == 4, result.stderr
    (line,) = result.stderr.splitlines()
    assert f"the governor at {address} cannot be reached (UNAVAILABLE)" in line
    assert "is `governor serve` running there" in line
    assert "--tls-ca" in line
    assert "failed to connect" not in line


def test_a_url_for_the_address_is_a_usage_error() -> None:
    """--address http://HOST:PORT is exit 2 naming the flag, as the trainer says it (it was exit 4 with grpc's
    'Misformatted domain name')."""
    result = governor_cli(["runs", "--address", "http://127.0.0.1:50051"], env=clean_env())
    assert result.returncode == 2, result.stderr
    assert "--address 'http://127.0.0.1:50051': expected HOST:PORT" in result.stderr


@pytest.mark.slow
def test_trainer_stderr_is_json_only_through_a_rollback(secured: tuple[DaemonProcess, Path], tmp_path: Path) -> None:
    """A NaN injection against a real governor: every stderr line is strict JSON (the standard library's
    `WARNING:tolaria.governed:` lines and bare NaN broke `jq`), the rollback's warning from the standard
    library's logging is among them; and the last stdout line is the --summary-json file's object."""
    daemon, folder = secured
    summary_file = tmp_path / "summary.json"
    result = trainer(
        "--epochs",
        "4",
        "--inject",
        "nan@epoch=2",
        "--address",
        daemon.address,
        "--token-file",
        str(folder / "trainer.token"),
        "--summary-json",
        str(summary_file),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [strict_json(line) for line in result.stderr.splitlines()]
    from_logging = [line for line in lines if str(line.get("logger", "")).startswith("tolaria.")]
    assert any("ROLLBACK" in line["event"] for line in from_logging), lines
    summary = strict_json(summary_file.read_text())
    assert strict_json(result.stdout.splitlines()[-1]) == summary
    assert summary["rollbacks"] >= 1
