"""The governor address (``--address``, GovernedTraining's ``governor``) checked before training starts:
a typo is a usage error that names the setting, not a run that trains ungoverned while the connection
retries. The rules are ``tolaria.address``'s, shared with the `governor` CLI; this raises the trainer's
own GovernorAddressError.
"""

from __future__ import annotations

from tolaria.address import EXAMPLE, GRPC_SCHEMES, AddressError, check_address
from tolaria_trainer.errors import GovernorAddressError

__all__ = ["EXAMPLE", "GRPC_SCHEMES", "check_governor_address"]


def check_governor_address(value: str, setting: str = "--address") -> str:
    """``value`` when it is a usable governor address; raises GovernorAddressError naming the setting
    (``setting``: the CLI flag, or GovernedTraining's ``governor``) and what is wrong."""
    try:
        return check_address(value, setting)
    except AddressError as exc:
        raise GovernorAddressError(str(exc)) from None
