"""The gRPC Governance of one rank: a GovernorConnection to the governor at an address.

``GovernedTraining`` is handed a ``Governance``; for a ``governor="host:port"`` argument this builds it
(the Hello from the rank and its options, the connection's options from theirs). Nothing is started
here: ``Governance.start`` opens the stream.
"""

from __future__ import annotations

from tolaria_trainer.address import check_governor_address
from tolaria_trainer.client.connection import GovernorConnection
from tolaria_trainer.client.messages import build_hello
from tolaria_trainer.client.sender import ClientOptions
from tolaria_trainer.options import GovernedOptions


def connect(address: str, run_id: str, rank: int, world_size: int, options: GovernedOptions) -> GovernorConnection:
    """The connection of rank ``rank`` of ``world_size`` to the governor at ``address`` (ValueError for a
    malformed one, naming the ``governor`` argument)."""
    check_governor_address(address, "governor")
    hello = build_hello(
        run_id,
        rank,
        world_size,
        options.task,
        num_classes=options.num_classes,
        random_guess_loss=options.random_guess_loss,
        policy=options.policy,
    )
    client_options = ClientOptions(
        heartbeat_s=options.heartbeat_s,
        token=options.token or "",
        tls_ca=options.tls_ca,
        tls_cert=options.tls_cert,
        tls_key=options.tls_key,
    )
    return GovernorConnection(address, hello, client_options)


__all__ = ["connect"]
