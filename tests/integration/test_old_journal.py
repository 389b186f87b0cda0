"""A journal written before the house was split (tests/fixtures/journal-716a6d2, written by
tests/fixtures/make_journal.py with the code of commit 716a6d2) verifies, restores and replays with today's code:
the journal's format is a contract, whatever moves inside the daemon."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from governor_daemon.testing import InProcessDaemon
from tests.conftest import REPO, governor_cli
from tolaria.controller import ControllerClient, RunState

FIXTURE = REPO / "tests/fixtures/journal-716a6d2"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(FIXTURE, copy)
    copy.chmod(0o700)
    return copy


def test_it_verifies_and_every_entry_reads(data_dir: Path) -> None:
    verified = governor_cli(["audit", "verify", "--data-dir", str(data_dir)])
    assert verified.returncode == 0, verified.stderr
    assert "61 entries in 1 segment(s) verify" in verified.stdout
    shown = governor_cli(["audit", "show", "--data-dir", str(data_dir)])
    assert shown.returncode == 0, shown.stderr
    assert "ROLLBACK" in shown.stdout
    assert "HALT" in shown.stdout


def test_a_daemon_restores_the_runs_it_holds(data_dir: Path) -> None:
    with InProcessDaemon(data_dir) as daemon, ControllerClient(daemon.address) as client:
        steady = client.panic_state("steady")
        assert (steady.state, steady.timeline, steady.num_rollbacks) == (RunState.FINISHED, 1, 1)
        assert steady.total_punishment_reward == -10.0
        duo = client.panic_state("duo")
        assert (duo.state, duo.timeline) == (RunState.HALTED, 0)
    verified = governor_cli(["audit", "verify", "--data-dir", str(data_dir)])
    assert verified.returncode == 0, verified.stderr  # and what today's daemon appended chains on


def test_its_export_replays_to_the_same_decisions(data_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "steady.jsonl"
    exported = governor_cli(["audit", "export", "--data-dir", str(data_dir), "--run", "steady", "--out", str(trace)])
    assert exported.returncode == 0, exported.stderr
    assert "exactly as judged (complete)" in exported.stdout
    replayed = governor_cli(["replay", str(trace)])
    assert replayed.returncode == 0, replayed.stderr
    assert "actions: rollback 1; total punishment -10; final timeline 1" in replayed.stdout


def test_the_fixture_is_as_written() -> None:
    """The fixture is the old code's output, not something regenerated with today's: never rewrite it."""
    assert sorted(p.name for p in FIXTURE.iterdir()) == ["journal-00000001.jsonl"]
    text = (FIXTURE / "journal-00000001.jsonl").read_text()
    assert text.count("\n") == 61
    assert "snapshot_adopted" not in text  # written before that entry kind existed
