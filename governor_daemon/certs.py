"""When the server's TLS certificate expires, read from its PEM without an X.509 library.

A certificate is DER: ``Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE, validity SEQUENCE { notBefore, notAfter },
... } ... }`` (RFC 5280, 4.1). Only the tag-length-value walk down to ``validity`` is needed.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime

EXPIRY_WARNING_DAYS = 30
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.DOTALL)


class CertificateError(ValueError):
    """The PEM holds no certificate whose validity can be read."""


def not_after(pem: bytes) -> datetime:
    """The expiry (UTC) of the first certificate in ``pem`` (the server's own, in a chain)."""
    found = _PEM.search(pem)
    if found is None:
        raise CertificateError("no BEGIN CERTIFICATE block")
    try:
        der = base64.b64decode(b"".join(found.group(1).split()), validate=True)
    except ValueError:  # binascii.Error is one
        raise CertificateError("the certificate block is not base64") from None
    certificate = _children(der, _value(der, 0, 0x30))
    tbs = _children(der, _value(der, certificate[0], 0x30))
    fields = tbs[1:] if der[tbs[0]] == 0xA0 else tbs  # skip the explicit [0] version
    if len(fields) < 4:
        raise CertificateError("tbsCertificate has no validity")
    validity = _children(der, _value(der, fields[3], 0x30))
    return _time(der, validity[1])


def expiry_warning(pem: bytes, now: datetime, within_days: int = EXPIRY_WARNING_DAYS) -> str | None:
    """A warning when the certificate has expired or expires within ``within_days``, else None."""
    try:
        expires = not_after(pem)
    except CertificateError as exc:
        return f"tls_cert: cannot read the certificate's expiry ({exc})"
    left = expires - now
    if left.total_seconds() <= 0:
        return f"tls_cert expired on {expires:%Y-%m-%d %H:%M} UTC: clients will refuse the connection; renew it"
    if left.days < within_days:
        days = f"{left.days} day" + ("" if left.days == 1 else "s")
        return f"tls_cert expires on {expires:%Y-%m-%d %H:%M} UTC, in {days}; renew it"
    return None


def _header(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the value, length of the value) of the TLV at ``at``."""
    if at + 2 > len(der):
        raise CertificateError("truncated DER")
    tag, first = der[at], der[at + 1]
    if first < 0x80:
        return tag, at + 2, first
    size = first & 0x7F
    if not 1 <= size <= 4 or at + 2 + size > len(der):
        raise CertificateError("bad DER length")
    return tag, at + 2 + size, int.from_bytes(der[at + 2 : at + 2 + size], "big")


def _value(der: bytes, at: int, tag: int) -> tuple[int, int]:
    """(start, end) of the value of the TLV at ``at``, which must have ``tag``."""
    found, start, length = _header(der, at)
    if found != tag or start + length > len(der):
        raise CertificateError(f"unexpected DER tag 0x{found:02x} at {at}")
    return start, start + length


def _children(der: bytes, span: tuple[int, int]) -> list[int]:
    """Offsets of the TLVs inside a constructed value (at least two: every SEQUENCE read has more)."""
    at, end, out = span[0], span[1], []
    while at < end:
        out.append(at)
        _, start, length = _header(der, at)
        at = start + length
    if len(out) < 2:
        raise CertificateError("a SEQUENCE with too few fields")
    return out


def _time(der: bytes, at: int) -> datetime:
    tag, start, length = _header(der, at)
    text = der[start : start + length].decode("ascii", errors="replace")
    try:
        if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280, 4.1.2.5.1)
            parsed = datetime.strptime(text, "%y%m%d%H%M%SZ")
            if parsed.year >= 2050:
                parsed = parsed.replace(year=parsed.year - 100)
        elif tag == 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
            parsed = datetime.strptime(text, "%Y%m%d%H%M%SZ")
        else:
            raise CertificateError(f"notAfter has tag 0x{tag:02x}")
    except ValueError:
        raise CertificateError(f"notAfter {text!r} is not a time") from None
    return parsed.replace(tzinfo=UTC)
