"""The one exit-code table both CLIs share: unique codes, each explained, each in both --help epilogs."""

from __future__ import annotations

import importlib

import pytest

from tolaria.exit_codes import HELP, ExitCode, epilog
from tolaria_trainer.cli import build_parser as trainer_parser

# The module, not the `main` function that governor_daemon.cli re-exports under the same name.
governor_main = importlib.import_module("governor_daemon.cli.main")


def test_codes_are_unique_and_each_has_help_text() -> None:
    values = [int(code) for code in ExitCode.__members__.values()]
    assert len(values) == len(set(values)), "two names share a number: a code would mean two things"
    assert set(HELP) == set(ExitCode)
    assert all(HELP[code].strip() for code in ExitCode)
    assert all(0 <= code <= 255 for code in values), "a process exit status is one byte"


@pytest.mark.parametrize("help_text", [governor_main.build_parser().format_help(), trainer_parser().format_help()])
def test_both_epilogs_list_every_code(help_text: str) -> None:
    assert epilog() in help_text
    for code in ExitCode:
        assert f"{int(code):>3}  {HELP[code]}" in help_text


def test_governor_interrupted_is_its_own_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a `governor` command is 130 (128 + SIGINT), not the internal-error code."""

    def interrupted(_run: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(governor_main, "exits_quietly_on_closed_pipe", interrupted)
    assert governor_main.main(["status", "some-run"]) == ExitCode.INTERRUPTED == 130
