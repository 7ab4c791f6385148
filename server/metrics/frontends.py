"""``trtserve_frontend_starts_total{reason}``: front-end processes that attached to the engine, by why they started.

The supervisor restarts a front end that dies, kills and restarts one that hangs (its watchdog), and replaces one
whose memory passed its limit; each of those is worth an alert, and only the engine serves /metrics, so the engine
counts the front ends that attach to it by the reason the supervisor gave the new process (it travels in the front
end's hello). Every reason is exported from the start as 0, so that ``increase()`` sees the first one.
"""
from __future__ import annotations

import threading
from typing import Dict, Iterator, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

# start: with the server; restart: after it died; watchdog: after the watchdog killed it for not running its event
# loop; replacement: a new one beside one past --frontend-max-memory-mib, which then drains
START_REASONS: Tuple[str, ...] = ("start", "restart", "watchdog", "replacement")


class FrontEndStarts(Collector):
    """Counts front-end attaches by start reason; ``started`` runs on the engine's loop, ``collect`` on the
    metrics server's thread."""

    NAME = "trtserve_frontend_starts_total"

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: Dict[str, int] = {r: 0 for r in START_REASONS}
        self._lock = threading.Lock()
        registry.register(self)

    def started(self, reason: str) -> None:
        with self._lock:
            if reason not in self._counts:  # a reason this engine does not know: never a new label value
                reason = "start"
            self._counts[reason] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = dict(self._counts)
        m = Metric(self.NAME, "Front-end processes attached to the engine, by why the supervisor started them "
                              "(start, restart after a death, watchdog, replacement for memory)", "counter")
        for reason, n in counts.items():
            m.add_sample(self.NAME, {"reason": reason}, float(n))
        yield m
