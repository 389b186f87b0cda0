"""Tolaria trainer: put a PyTorch training loop under the governor.

``GovernedTraining`` (``governed.py``) governs any loop; ``tolaria-train`` (``cli.py``, ``loop.py``) is
the morphogenetic trainer built on it. The names below are imported lazily, so that ``tolaria-train``
without torch can say which extra to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tolaria import package_version

__version__ = package_version()  # the installed distribution's (pyproject.toml), not a second copy of it

if TYPE_CHECKING:
    from tolaria_trainer.governed import GovernedTraining, GovernorUnreachable, Outcome, RunHalted
    from tolaria_trainer.options import GovernedOptions

_LAZY = {
    "GovernedOptions": "tolaria_trainer.options",
    "GovernedTraining": "tolaria_trainer.governed",
    "GovernorUnreachable": "tolaria_trainer.governed",
    "Outcome": "tolaria_trainer.governed",
    "RunHalted": "tolaria_trainer.governed",
}

__all__ = ["GovernedOptions", "GovernedTraining", "GovernorUnreachable", "Outcome", "RunHalted", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tolaria_trainer' has no attribute {name!r}")
