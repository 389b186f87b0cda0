"""Fail-open or fail-closed: what a governed loop does while its governor is away or refused it."""

from __future__ import annotations

import logging
import time

from tolaria_trainer.errors import GovernorUnreachable
from tolaria_trainer.governance import FinishReport, Governance

log = logging.getLogger("tolaria.governed")


class Reachability:
    """Whether training may go on without the governor's word, and how long the end waits for it.

    Invariant: fail-closed, no step trains before the governor welcomed this trainer, an agreement point
    waits while it is unreachable (GovernorUnreachable past ``deadline_s``), and a refusal raises
    GovernorRefused; fail-open, training goes on and the refusal is logged once.
    """

    def __init__(self, governance: Governance, fail_closed: bool, deadline_s: float, connect_wait_s: float) -> None:
        self.governance = governance
        self.fail_closed = fail_closed
        self.deadline_s = deadline_s
        self.connect_wait_s = connect_wait_s
        self._warned_refusal = False

    def connect(self) -> None:
        """Start the connection, waiting up to ``connect_wait_s`` (fail-closed: and no longer than the deadline)
        for the first Welcome; fail-closed, wait on until it came."""
        wait = min(self.connect_wait_s, self.deadline_s) if self.fail_closed else self.connect_wait_s
        if not self.governance.governed or self.governance.start(wait):
            return
        if self.fail_closed:
            self.check()  # not one step before the governor welcomed this trainer
            return
        self.check_refusal()
        if self.governance.refusal is None:
            log.warning("governor not reachable yet; training continues and keeps retrying (fail-open)")

    def check_refusal(self) -> None:
        """Raise the governor's refusal (fail-closed), or log it once (fail-open)."""
        refusal = self.governance.refusal
        if refusal is None:
            return
        if self.fail_closed:
            raise refusal
        if not self._warned_refusal:
            self._warned_refusal = True
            log.error("%s; training continues UNGOVERNED (use fail_closed to stop instead)", refusal)

    def check(self) -> None:
        """At an agreement point: fail-closed, wait while the governor is unreachable, up to ``deadline_s``."""
        self.check_refusal()
        if not self.fail_closed or not self.governance.governed:
            return
        while not self.governance.connected:
            self.check_refusal()
            if self.governance.unreachable_for_s() > self.deadline_s:
                raise GovernorUnreachable(f"governor unreachable for more than {self.deadline_s:g} s (fail-closed)")
            time.sleep(0.1)

    def finish(self, finish: FinishReport | None, timeout_s: float) -> bool:
        """Tell the governor how the run ended (None: it is not told, nor waited for more than half a second)
        and wait up to ``timeout_s`` for it to take the last records; True if every record was acknowledged."""
        governance = self.governance
        if finish is None:
            timeout_s = min(timeout_s, 0.5)
        elif governance.pending() and not governance.connected:
            log.info("waiting up to %.0f s for the governor to take the last records", timeout_s)
        flushed = governance.close(finish, timeout_s)
        if not flushed and finish is not None:
            log.warning("not every record reached the governor: %d pending", governance.pending())
        return flushed
