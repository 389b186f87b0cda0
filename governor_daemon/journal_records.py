"""The journal's typed records and entry kinds (``tolaria.journal``, the contract of every entry's payload), as
the daemon's core builds them.

``governor_daemon/core`` imports no ``tolaria`` (``tests/unit/core/test_core.py``: the core stays free of the
contract's generated protobuf code); ``tolaria.journal`` is plain Python that imports none of it, so the core
takes the records from here. Everything outside the core imports ``tolaria.journal`` directly.
"""

from __future__ import annotations

from tolaria.journal import *  # noqa: F403 (the whole contract, re-exported)
from tolaria.journal import __all__ as __all__
