"""A request waiting in (or taken from) a batcher queue."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Tuple

import numpy as np

Shape = Tuple[int, ...]


@dataclasses.dataclass
class Pending:
    """One validated request. ``shapes`` are the non-batch shapes per input (full shape when the
    model does not batch); ``rows`` is its batch dimension (1 when the model does not batch)."""

    inputs: Mapping[str, np.ndarray]
    outputs: Tuple[str, ...]
    rows: int
    shapes: Dict[str, Shape]
    level: int  # priority level, 1 = highest
    arrival: float  # batcher clock, seconds
    future: "asyncio.Future[RequestResult]"
    queue_deadline: Optional[float] = None  # queue-policy timeout (batcher clock)
    deadline: Optional[float] = None  # the client's gRPC deadline (batcher clock)
    delayed: bool = False  # timed out under timeout_action DELAY: runs only after all others
    seq: int = 0  # arrival order, for FIFO and preserve_ordering
    device_outputs: Mapping[str, Tuple[int, int]] = dataclasses.field(default_factory=dict)  # see DeviceDestination
    # called (on the loop) when the request is handed to an instance: from then on its input memory is read
    # until its future is settled, even if the client cancels, so the caller must not reuse it before
    on_dispatch: Optional[Callable[[], None]] = None


@dataclasses.dataclass
class RequestResult:
    """What a request's future resolves to."""

    outputs: Dict[str, np.ndarray]
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    batch_size: int
    delivered: FrozenSet[str] = frozenset()  # outputs the backend already wrote into the request's device memory
