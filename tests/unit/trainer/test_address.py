"""`--address` is checked before training: typos are usage errors naming the flag."""

from __future__ import annotations

import pytest

from tolaria_trainer.address import check_governor_address
from tolaria_trainer.errors import GovernorAddressError


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("127.0.0.1:5oo51", "the port '5oo51' is not a number"),
        ("localhost", "no port"),
        ("[::1]", "no port"),
        ("localhost:", "the port '' is not a number"),
        ("http://x:1", "no URL or grpc target scheme"),
        ("unix:/tmp/governor.sock", "no URL or grpc target scheme"),
        ("dns:1234", "no URL or grpc target scheme"),  # grpc would read "dns:" as the scheme
        (":50051", "no host"),
        ("127.0.0.1:0", "not a number in 1..65535"),
        ("127.0.0.1:65536", "not a number in 1..65535"),
        ("::1:50051", "an IPv6 address goes in brackets"),
        ("[not-v6]:50051", "[not-v6] is not an IPv6 address"),
        ("bad host:50051", "'bad host' is not a host name"),
        ("-x:50051", "'-x' is not a host name"),
        ("no-such-host.invalid:50051", "the host no-such-host.invalid does not resolve"),  # RFC 6761: never resolves
    ],
)
def test_bad_addresses_name_the_flag_and_the_problem(value: str, why: str) -> None:
    with pytest.raises(GovernorAddressError) as info:
        check_governor_address(value)
    assert str(info.value).startswith(f"--address {value!r}: ")
    assert why in str(info.value)


@pytest.mark.parametrize("value", ["127.0.0.1:50051", "localhost:65535", "[::1]:50051"])
def test_good_addresses_pass_unchanged(value: str) -> None:
    assert check_governor_address(value) == value
