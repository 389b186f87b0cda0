"""How a client names its connection to a governor, the same way in both CLIs (`governor` and `tolaria-train`).

One table (``OPTIONS``) gives each setting's flag and environment variable:

====================  ==========================  ============================================
flag                  environment                 meaning
====================  ==========================  ============================================
``--address``         ``GOVERNOR_ADDRESS``        the governor, ``HOST:PORT`` or ``[IPV6]:PORT``
``--token``           ``GOVERNOR_TOKEN``          bearer token
``--token-file``      ``GOVERNOR_TOKEN_FILE``     file holding the bearer token
``--tls-ca``          ``GOVERNOR_TLS_CA``         PEM CA of the governor's certificate: use TLS
``--tls-cert``        ``GOVERNOR_CLIENT_CERT``    client certificate (mTLS)
``--tls-key``         ``GOVERNOR_CLIENT_KEY``     client key (mTLS)
====================  ==========================  ============================================

The client certificate's variables are ``GOVERNOR_CLIENT_*``, not ``GOVERNOR_TLS_CERT``/``_KEY``: those are
`governor serve`'s own server certificate, and a health check run inside the daemon's container must not
present the server's certificate as a client's.

`tolaria-train`'s earlier spellings (``--governor``, ``TOLARIA_GOVERNOR``, ``TOLARIA_TOKEN``,
``TOLARIA_TOKEN_FILE``, ``TOLARIA_TLS_CA``, ``TOLARIA_TLS_CERT``, ``TOLARIA_TLS_KEY``) still work as
deprecated aliases: ``resolve`` reports them, and the CLI prints one deprecation warning. A flag wins over
the environment, a current variable over a deprecated one.

This module imports neither torch nor grpc: the daemon's CLI and the trainer's both use it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tolaria.address import check_address


@dataclass(frozen=True)
class Option:
    """One connection setting: its ``dest`` on the parsed arguments, flag, variable and the old spellings."""

    dest: str
    flag: str
    env: str
    help: str
    old_flags: tuple[str, ...] = ()
    old_envs: tuple[str, ...] = ()


ADDRESS = Option(
    "address",
    "--address",
    "GOVERNOR_ADDRESS",
    "governor address, HOST:PORT or [IPV6]:PORT",
    ("--governor",),
    ("TOLARIA_GOVERNOR",),
)
TOKEN = Option("token", "--token", "GOVERNOR_TOKEN", "bearer token", (), ("TOLARIA_TOKEN",))
TOKEN_FILE = Option(
    "token_file",
    "--token-file",
    "GOVERNOR_TOKEN_FILE",
    "file holding the bearer token (e.g. a <role>.token from `governor tokens init`); excludes --token",
    (),
    ("TOLARIA_TOKEN_FILE",),
)
TLS_CA = Option(
    "tls_ca",
    "--tls-ca",
    "GOVERNOR_TLS_CA",
    "PEM CA of the governor's certificate: use TLS (without it the channel is plaintext)",
    (),
    ("TOLARIA_TLS_CA",),
)
TLS_CERT = Option(
    "tls_cert", "--tls-cert", "GOVERNOR_CLIENT_CERT", "client certificate (mTLS)", (), ("TOLARIA_TLS_CERT",)
)
TLS_KEY = Option("tls_key", "--tls-key", "GOVERNOR_CLIENT_KEY", "client key (mTLS)", (), ("TOLARIA_TLS_KEY",))
OPTIONS: tuple[Option, ...] = (ADDRESS, TOKEN, TOKEN_FILE, TLS_CA, TLS_CERT, TLS_KEY)
"""Every connection setting, in the order --help lists them."""
TLS_OPTIONS: tuple[Option, ...] = (TLS_CA, TLS_CERT, TLS_KEY)
DEFAULT_ADDRESS = "127.0.0.1:50051"
_OLD = "_deprecated_"  # dest prefix of a deprecated flag


@dataclass(frozen=True)
class ClientSettings:
    """Where and how to reach the governor, resolved from flags and environment."""

    address: str | None
    """None: no address anywhere (`tolaria-train` then trains ungoverned)."""
    token: str
    """The token, read from --token-file when that was given; '' for none."""
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    deprecations: tuple[str, ...]
    """Deprecated spellings used, each as 'OLD is now NEW'."""


def environment_variables(options: Sequence[Option] = OPTIONS, legacy: bool = False) -> tuple[str, ...]:
    """The variables these options read (with ``legacy``, the deprecated ones too)."""
    names = [o.env for o in options]
    if legacy:
        names += [old for o in options for old in o.old_envs]
    return tuple(names)


def add_arguments(
    parser: argparse.ArgumentParser,
    options: Sequence[Option] = OPTIONS,
    *,
    default_address: str | None = DEFAULT_ADDRESS,
    address_help: str = "",
    legacy: bool = False,
) -> None:
    """Add the connection flags. Their defaults are None: ``resolve`` fills them from the environment.

    ``legacy`` also accepts the deprecated flags (hidden from --help); ``address_help`` is appended to the
    address's help (what happens without one).
    """
    for option in options:
        default = f"; default {default_address}" if option is ADDRESS and default_address else ""
        extra = f"; {address_help}" if option is ADDRESS and address_help else ""
        metavar = "HOST:PORT" if option is ADDRESS else ("TOKEN" if option is TOKEN else "FILE")
        parser.add_argument(
            option.flag, default=None, metavar=metavar, help=f"{option.help} [{option.env}{default}]{extra}"
        )
        if legacy:
            for old in option.old_flags:
                parser.add_argument(old, dest=_OLD + option.dest, default=None, help=argparse.SUPPRESS)


def resolve(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    options: Sequence[Option] = OPTIONS,
    *,
    default_address: str | None = DEFAULT_ADDRESS,
    legacy: bool = False,
) -> ClientSettings:
    """The settings from ``args`` (parsed with ``add_arguments``) and the environment; the address is checked.

    Raises ValueError naming the flag or variable: a malformed or unresolvable address, a flag given in both
    its current and its deprecated spelling, --token with --token-file, a token file that cannot be read,
    --tls-cert without --tls-key.
    """
    env = os.environ if environ is None else environ
    deprecations: list[str] = []
    values: dict[str, str | None] = {}
    source: dict[str, str] = {}
    for option in options:
        values[option.dest], source[option.dest] = _option_value(option, args, env, legacy, deprecations)
    address = values.get("address") or default_address
    if address and "address" in values:
        check_address(address, source["address"] if values.get("address") else "--address")
    token = _token(values, source)
    cert, key = values.get("tls_cert"), values.get("tls_key")
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together (mTLS)")
    return ClientSettings(
        address=address,
        token=token,
        tls_ca=values.get("tls_ca"),
        tls_cert=cert,
        tls_key=key,
        deprecations=tuple(deprecations),
    )


def _option_value(
    option: Option, args: argparse.Namespace, env: Mapping[str, str], legacy: bool, deprecations: list[str]
) -> tuple[str | None, str]:
    """One option's value (None if unset) and where it came from: its flag, else its deprecated flag (with
    ``legacy``), else its variable, else its deprecated variables. Each deprecated spelling used, or set and
    ignored, is added to ``deprecations``."""
    value = getattr(args, option.dest, None)
    source = option.flag
    old_value = getattr(args, _OLD + option.dest, None) if legacy else None
    if old_value is not None:
        old_flag = option.old_flags[0]
        if value is not None:
            raise ValueError(f"{option.flag} and its deprecated spelling {old_flag} both given: keep {option.flag}")
        value = old_value
        source = old_flag
        deprecations.append(f"{old_flag} is now {option.flag}")
    if value is None and env.get(option.env):
        value = env[option.env]
        source = option.env
    for old_env in option.old_envs if legacy else ():
        if env.get(old_env):
            if value is None:
                value = env[old_env]
                source = old_env
                deprecations.append(f"{old_env} is now {option.env}")
            else:
                deprecations.append(f"{old_env} is now {option.env} (ignored: {source} is set)")
    return value or None, source


def _token(values: Mapping[str, str | None], source: Mapping[str, str]) -> str:
    """The token: --token's, or the content of --token-file (the two exclude each other); '' for none."""
    token = values.get("token") or ""
    token_file = values.get("token_file")
    if token_file:
        if token:
            raise ValueError(f"{source['token']} and {source['token_file']} exclude each other")
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{source['token_file']} {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"{source['token_file']} {token_file}: the file is empty")
    return token
