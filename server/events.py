"""What the core reports, as an injected observer (the core never imports prometheus_client).

``metrics/statistics.py`` (the ModelStatistics RPC) and ``metrics/prometheus.py`` implement it;
``Fanout`` sends each event to several observers. Durations are in nanoseconds, as in Triton's
statistics, and are measured with ``time.monotonic_ns``-compatible clocks.
"""
from __future__ import annotations

from typing import Sequence


class Observer:
    """No-op base; subclasses override what they need. Calls come from the event loop thread."""

    def request_queued(self, model: str, version: str, priority: int) -> None:
        """A request entered the batcher's queue (pending count +1)."""

    def request_dequeued(self, model: str, version: str, priority: int) -> None:
        """A request left the queue: batched, timed out, cancelled (pending count -1)."""

    def request_done(
        self, model: str, version: str, ok: bool, reason: str, rows: int, request_ns: int, queue_ns: int,
        compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int,
    ) -> None:
        """One request answered. ``reason`` is "" on success, else one of: rejected, timeout, cancelled,
        invalid, backend, unavailable (Triton's failure ``reason`` label)."""

    def batch_done(
        self, model: str, version: str, batch_size: int, requests: int, compute_input_ns: int,
        compute_infer_ns: int, compute_output_ns: int, ok: bool,
    ) -> None:
        """One batch executed (``batch_size`` rows from ``requests`` requests)."""

    def model_state(self, model: str, version: str, state: str, load_s: float = 0.0) -> None:
        """A model version changed state (LOADING, READY, UNLOADING, UNAVAILABLE)."""


class Fanout(Observer):
    """Sends every event to each observer in order."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

    def request_queued(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.request_queued(*a, **k)

    def request_dequeued(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.request_dequeued(*a, **k)

    def request_done(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.request_done(*a, **k)

    def batch_done(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.batch_done(*a, **k)

    def model_state(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.model_state(*a, **k)
