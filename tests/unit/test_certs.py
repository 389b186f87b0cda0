"""The server certificate's expiry, read without an X.509 library (governor_daemon/certs.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from governor_daemon.certs import CertificateError, expiry_warning, not_after
from tests.conftest import openssl


def self_signed(folder: Path, days: int) -> bytes:
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out", "c.pem"]
    openssl(folder, *args, "-days", str(days), "-subj", "/CN=governor")
    return (folder / "c.pem").read_bytes()


def openssl_end_date(folder: Path) -> datetime:
    out = openssl(folder, "x509", "-in", "c.pem", "-noout", "-enddate")
    return datetime.strptime(out.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)


@pytest.mark.parametrize("days", [3, 10_000])  # UTCTime, and GeneralizedTime (after 2049)
def test_not_after_matches_openssl(tmp_path: Path, days: int) -> None:
    pem = self_signed(tmp_path, days)
    assert not_after(b"a chain starts with the server's own\n" + pem + pem) == openssl_end_date(tmp_path)


def test_expiring_expired_and_unreadable_certificates_are_named(tmp_path: Path) -> None:
    pem = self_signed(tmp_path, 3)
    now = datetime.now(UTC)
    soon = expiry_warning(pem, now)
    assert soon is not None
    assert "expires on" in soon
    assert "in 2 days" in soon  # 3 days less the seconds since openssl signed it
    assert expiry_warning(pem, now, within_days=2) is None
    gone = expiry_warning(pem, now + timedelta(days=4))
    assert gone is not None
    assert "expired on" in gone
    assert "cannot read" in (
        expiry_warning(b"-----BEGIN CERTIFICATE-----\nnot*base64\n-----END CERTIFICATE-----", now) or ""
    )
    with pytest.raises(CertificateError):
        not_after(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----")
