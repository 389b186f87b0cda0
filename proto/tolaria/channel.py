"""The gRPC channel to a governor daemon, as every client opens it: the trainer's (``tolaria_trainer.client``),
the controller library's (``tolaria.controller``) and `governor health`'s."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the daemon: the PEM CA that signed its certificate, and for mTLS a client certificate and key."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | os.PathLike[str],
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
    ) -> TlsConfig:
        """Read the PEM files (raises OSError for one that cannot be read)."""
        return cls(
            Path(ca).read_bytes(),
            None if cert is None else Path(cert).read_bytes(),
            None if key is None else Path(key).read_bytes(),
        )


def open_channel(address: str, tls: TlsConfig | None = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``address``: plaintext without ``tls``, TLS with it (mTLS when it has a client certificate).
    ``options`` are gRPC channel arguments."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
    return grpc.secure_channel(address, credentials, options=list(options))
