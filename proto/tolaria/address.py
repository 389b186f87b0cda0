"""A governor address checked before it is used: a typo is a usage error that names the setting, not a
client that retries a connection that can never work (a trainer that trains ungoverned meanwhile).

Accepted: ``HOST:PORT`` and ``[IPV6]:PORT``, with a port in 1..65535 and a host (an IPv4 address or a
DNS name) that resolves now. Nothing else, because the governor listens on TCP only (`governor serve
--listen HOST:PORT`): URLs and grpc's other target forms (``dns:``, ``unix:``, ``unix-abstract:``,
``ipv4:``, ``ipv6:``, ``vsock:``) are refused rather than half supported, and a host spelled like one
of those schemes would be read by grpc as the scheme.

Both CLIs (``--address``) and ``GovernedTraining(governor=...)`` check through ``check_address``.
"""

from __future__ import annotations

import ipaddress
import re
import socket

GRPC_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock"})
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"  # underscores too: container runtimes' DNS serves such names
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
EXAMPLE = "expected HOST:PORT or [IPV6]:PORT, e.g. 127.0.0.1:50051"


class AddressError(ValueError):
    """A governor address that is malformed or whose host does not resolve; the message names the setting."""


def check_address(value: str, setting: str = "--address") -> str:
    """``value`` when it is a usable governor address; raises AddressError naming the setting (``setting``:
    a CLI flag, an environment variable, or GovernedTraining's ``governor``) and what is wrong. Resolving the
    host may take as long as the system's DNS takes to answer."""

    def bad(why: str) -> AddressError:
        return AddressError(f"{setting} {value!r}: {why}")

    if "://" in value or value.partition(":")[0].lower() in GRPC_SCHEMES:
        raise bad(f"{EXAMPLE}; no URL or grpc target scheme: the governor listens on TCP (governor serve --listen)")
    host, sep, port_text = value.rpartition(":")
    if not sep or value.endswith("]"):
        raise bad(f"no port: {EXAMPLE}")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise bad(f"the port {port_text!r} is not a number in 1..65535")
    if host.startswith("[") and host.endswith("]"):
        name = host[1:-1]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise bad(f"{host} is not an IPv6 address in brackets") from None
    elif ":" in host:
        raise bad(f"an IPv6 address goes in brackets: [ADDRESS]:PORT, e.g. [::1]:{port_text}")
    elif not host:
        raise bad(f"no host: {EXAMPLE}")
    elif len(host) > 253 or not _HOST_NAME.fullmatch(host):
        raise bad(f"{host!r} is not a host name or an IPv4 address")
    else:
        name = host
    try:
        socket.getaddrinfo(name, int(port_text), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise bad(f"the host {name} does not resolve ({reason})") from None
    return value
