"""How much a model's requests meet each other, for batch rule 4 (policy.py): a partial batch may wait on an idle
instance only while the model is contended, and only as long as requests keep coming.

Contended: most recent arrivals found other requests of the model queued or running, so clients have more requests
in flight than one batch and more are on their way. A lone client never finds its model in use (its next request
waits for this answer), so its requests never wait. A held batch waits past the last arrival for a few of the
recent gaps between arrivals, so a hold ends soon after requests stop coming instead of always lasting the queue
delay. The gap is per request: requests read together (one wake-up of the engine) share the time since the last
read, so how often the loop happens to look (a loop that sleeps until woken reads more at once than one that
polls) does not stretch the hold.
"""
from __future__ import annotations

from typing import Optional

# the weight of each arrival in the moving average of arrivals that found the model in use (about the last ten
# count), and the share from which the model is contended; after a burst, about seven requests of a lone client go
# by before the average falls below the mark again
WEIGHT = 0.1
HOLD_AT = 0.5
# below this share the model's requests are a lone client's (they seldom meet another): one may run at once,
# inside the read that brought it (scheduler.py ``_at_once``); between it and HOLD_AT the queue decides, so that
# requests read in the same turn of the engine's loop still share a batch
LONE_BELOW = 0.25
# a held batch waits past the last arrival this many of the recent gaps between arrivals (a moving average with
# this weight)
GAP_WEIGHT = 0.1
HOLD_GAPS = 2.0


class Contention:
    """One model version's measure; fed by the scheduler (``arrival`` per queued request, ``look`` per wake-up)."""

    def __init__(self) -> None:
        self.share = 0.0  # moving average: arrivals that found the model in use
        self._gap = 0.0  # moving average of the time between requests (per request of each look), see ``look``
        self._last: Optional[float] = None  # when a look last found new requests
        self._arrived = 0  # requests arrived since the last look
        self._joined = False  # ... and found others queued

    def arrival(self, queued: bool, running: bool, count: int = 1) -> None:
        """A request arrived (``count``: an entry standing for that many); ``queued``: others of the model were waiting
        in its queue; ``running``: a batch of it was running."""
        self._arrived += count
        self._joined = self._joined or queued
        self.share += WEIGHT * ((queued or running) - self.share)

    def look(self, now: float) -> None:
        """The scheduler looks at its queue at ``now``: what arrived since the last look arrived then, spread over the
        time since the previous look that found arrivals (the gap learnt is that time over their number). It is learnt
        only while the model is contended and when something joined requests already queued: the gap before the first
        request of a burst (often a pause, or the wait for the previous batch's answers) says nothing about how soon
        the next one joins a held batch."""
        if not self._arrived:
            return
        if self._joined and self.share >= HOLD_AT and self._last is not None:
            self._gap += GAP_WEIGHT * ((now - self._last) / self._arrived - self._gap)
        self._last, self._arrived, self._joined = now, 0, False

    def lone(self) -> bool:
        """Whether recent arrivals seldom found the model in use (a lone client's)."""
        return self.share < LONE_BELOW

    def hold_until(self) -> Optional[float]:
        """Until when an idle instance may hold a partial batch; None when it runs at once (not contended)."""
        if self.share < HOLD_AT or self._last is None:
            return None
        return self._last + HOLD_GAPS * self._gap
