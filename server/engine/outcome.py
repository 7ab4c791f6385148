"""What a settled request becomes on its way out, for one request and for a group alike: its status code and
message, its result written without failing the batch's other answers, its outputs on the host in the arena's byte
order, and its success counted with the others of the loop turn."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.server.errors import Internal, TrtServeError
from trtserve.server.events import Done, Observer

log = logging.getLogger("trtserve.engine")

# each fixed-size datatype as it lies in the arena (little-endian), looked up per tensor instead of rebuilt
ARENA_DTYPES = {w: (d.numpy.newbyteorder("<") if d.itemsize > 1 else d.numpy)
                for w, d in dtypes.BY_WIRE.items() if w != "BYTES"}


class Successes:
    """Successful requests answered in this loop turn, per model version: the observers get them in one call per
    version and turn (a batch's answers arrive together), not one per request."""

    def __init__(self, observer: Observer) -> None:
        self._observer = observer
        self._pending: Dict[Tuple[str, str], List[Done]] = {}

    def count(self, model: str, version: str, done: List[Done]) -> None:
        """Counted in the loop turn after the answers were written: the flush is queued on the loop before the
        answers go out, so a statistics call that follows an answer finds the request counted (a /metrics
        scrape, on its own thread, may see it one loop turn later)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.setdefault((model, version), []).extend(done)

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for (model, version), done in pending.items():
            self._observer.requests_done(model, version, done)


def guarded(spec: Any, write: Callable[[], Any]) -> Tuple[Any, Optional[BaseException]]:
    """(what ``write`` returned, None), or (None, the error to answer with): writing a result must not fail the
    batch's other answers."""
    try:
        return write(), None
    except TrtServeError as e:
        return None, e
    except Exception as e:
        log.exception("model '%s': writing a result failed", spec.name)
        return None, Internal(f"model '{spec.name}': writing the result failed: {type(e).__name__}: {e}")


def failure(error: BaseException) -> Tuple[str, str, str]:
    """(status code, message, statistics reason) to answer a failed request with."""
    if isinstance(error, TrtServeError):
        return error.code, error.message, error.reason
    return "INTERNAL", f"{type(error).__name__}: {error}", "backend"


def on_host(array: Any) -> np.ndarray:
    """A backend's output as a NumPy array: as it is in the usual case (a host result), else copied from the device
    or converted."""
    if type(array) is np.ndarray:
        return array
    return _to_host(array) if hasattr(array, "__cuda_array_interface__") else np.asarray(array)


def _to_host(array: Any) -> np.ndarray:
    import cupy  # only a device result (CuPy) gets here

    return cupy.asnumpy(array)
