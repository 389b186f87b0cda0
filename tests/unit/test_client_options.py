"""The connection settings both CLIs share (``tolaria.client_options``): flag > current variable > deprecated
variable, each deprecated spelling reported, contradictions refused naming both spellings."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tolaria import client_options


def parse(argv: list[str], env: dict[str, str], legacy: bool = True) -> client_options.ClientSettings:
    """Parse ``argv`` as `tolaria-train` does (no default address) with ``env`` as the environment."""
    parser = argparse.ArgumentParser()
    client_options.add_arguments(parser, default_address=None, legacy=legacy)
    args = parser.parse_args(argv)
    return client_options.resolve(args, env, default_address=None, legacy=legacy)


def test_a_flag_wins_over_the_environment_and_a_current_variable_over_a_deprecated_one() -> None:
    """--address beats GOVERNOR_ADDRESS, which beats TOLARIA_GOVERNOR (reported as ignored)."""
    env = {"GOVERNOR_ADDRESS": "127.0.0.1:2", "TOLARIA_GOVERNOR": "127.0.0.1:3"}
    assert parse(["--address", "127.0.0.1:1"], env).address == "127.0.0.1:1"
    settings = parse([], env)
    assert settings.address == "127.0.0.1:2"
    assert settings.deprecations == ("TOLARIA_GOVERNOR is now GOVERNOR_ADDRESS (ignored: GOVERNOR_ADDRESS is set)",)


def test_deprecated_spellings_still_work_and_are_each_reported(tmp_path: Path) -> None:
    """--governor, TOLARIA_TOKEN_FILE and TOLARIA_TLS_CA give their values, and say their new names."""
    token = tmp_path / "trainer.token"
    token.write_text("secret-token\n")
    env = {"TOLARIA_TOKEN_FILE": str(token), "TOLARIA_TLS_CA": "ca.pem"}
    settings = parse(["--governor", "127.0.0.1:1"], env)
    assert (settings.address, settings.token, settings.tls_ca) == ("127.0.0.1:1", "secret-token", "ca.pem")
    assert settings.deprecations == (
        "--governor is now --address",
        "TOLARIA_TOKEN_FILE is now GOVERNOR_TOKEN_FILE",
        "TOLARIA_TLS_CA is now GOVERNOR_TLS_CA",
    )


def test_without_legacy_the_old_spellings_are_not_read() -> None:
    """The `governor` CLI never read TOLARIA_*: a trainer's variables in the shell do not become its own."""
    settings = client_options.resolve(argparse.Namespace(), {"TOLARIA_TOKEN": "trainer-secret"})
    assert (settings.token, settings.address, settings.deprecations) == ("", "127.0.0.1:50051", ())


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--address", "127.0.0.1:1", "--governor", "127.0.0.1:2"], {}, "--address and its deprecated spelling"),
        (["--token", "x", "--token-file", "f"], {}, "--token and --token-file exclude each other"),
        ([], {"GOVERNOR_TOKEN": "x", "TOLARIA_TOKEN_FILE": "f"}, "GOVERNOR_TOKEN and TOLARIA_TOKEN_FILE exclude"),
        (["--token-file", "/no/such/file"], {}, "--token-file /no/such/file: No such file"),
        (["--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
        ([], {"GOVERNOR_ADDRESS": "http://x:1"}, "GOVERNOR_ADDRESS 'http://x:1': expected HOST:PORT"),
    ],
)
def test_contradictions_and_bad_values_name_their_source(argv: list[str], env: dict[str, str], message: str) -> None:
    """Each is a ValueError (exit 2 in both CLIs) naming the flag or variable it came from."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(argv, env)


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    """A token file with nothing in it would silently mean 'no token'."""
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="the file is empty"):
        parse(["--token-file", str(empty)], {})
