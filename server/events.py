"""What the core reports, as an injected observer (the core never imports prometheus_client).

``metrics/statistics.py`` (the ModelStatistics RPC) and ``metrics/prometheus.py`` implement it;
``Fanout`` sends each event to several observers. Durations are in nanoseconds, as in Triton's
statistics, and are measured with ``time.monotonic_ns``-compatible clocks.
"""
from __future__ import annotations

from typing import Sequence, Tuple

# one successful request in ``Observer.requests_done``: rows, request_ns, queue_ns, compute_input_ns,
# compute_infer_ns, compute_output_ns
Done = Tuple[int, int, int, int, int, int]


class Observer:
    """No-op base; subclasses override what they need. Calls come from the event loop thread."""

    def request_queued(self, model: str, version: str, priority: int, count: int = 1) -> None:
        """``count`` requests entered the batcher's queue (pending count +count)."""

    def request_dequeued(self, model: str, version: str, priority: int, count: int = 1) -> None:
        """``count`` requests left the queue: batched, timed out, cancelled (pending count -count)."""

    def request_done(
        self, model: str, version: str, ok: bool, reason: str, rows: int, request_ns: int, queue_ns: int,
        compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int,
    ) -> None:
        """One request answered. ``reason`` is "" on success, else one of: rejected, timeout, cancelled,
        invalid, backend, unavailable (Triton's failure ``reason`` label)."""

    def requests_done(self, model: str, version: str, done: Sequence[Done]) -> None:
        """Successful requests answered together (usually one batch's): one call per batch, not per request,
        keeps the engine's cost per request small. The default hands each to ``request_done``."""
        for rows, request_ns, queue_ns, cin, cinfer, cout in done:
            self.request_done(model, version, True, "", rows, request_ns, queue_ns, cin, cinfer, cout)

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

    def requests_done(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.requests_done(*a, **k)

    def batch_done(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.batch_done(*a, **k)

    def model_state(self, *a, **k) -> None:  # type: ignore[override]
        for o in self._observers:
            o.model_state(*a, **k)
