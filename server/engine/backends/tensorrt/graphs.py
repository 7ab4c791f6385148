"""CUDA graphs per (instance, batch-size bucket): bucket choice (pure) and a capture that falls back.

Rules followed (shared/reference/tensorrt-api.md §3, §6.7): one normal enqueue before capture; thread-local
capture mode on the instance's own non-default stream; nothing allocates during capture; a failed capture is
ended, the sticky CUDA error cleared, and the instance serves that bucket eagerly.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any, Callable, Optional, Sequence, Tuple

log = logging.getLogger("trtserve.executor.graphs")


def bucket_sizes(lo: int, hi: int, explicit: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """Batch sizes to capture for a profile allowing ``lo..hi`` rows: ``explicit`` (clipped) or powers of two,
    always including ``hi`` so that every batch has a bucket."""
    if lo < 1 or hi < lo:
        raise ValueError(f"bad batch range {lo}..{hi}")
    if explicit:
        sizes = {b for b in explicit if lo <= b <= hi}
    else:
        sizes = {lo}
        b = 1
        while b < hi:
            if b >= lo:
                sizes.add(b)
            b *= 2
    sizes.add(hi)
    return tuple(sorted(sizes))


def pick_bucket(buckets: Sequence[int], rows: int) -> Optional[int]:
    """The smallest bucket holding ``rows`` (padding rows are zero-filled), or None."""
    for b in buckets:
        if b >= rows:
            return b
    return None


def _clear_sticky_error() -> None:
    """cudaGetLastError() after a failed capture, so the next CUDA call does not report the old error.
    CuPy does not wrap it; call the runtime CuPy already loaded."""
    for lib in ("libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
        try:
            ctypes.CDLL(lib).cudaGetLastError()
            return
        except OSError:
            continue


def capture(stream: Any, enqueue: Callable[[], None], what: str) -> Optional[Any]:
    """Captures what ``enqueue`` puts on ``stream`` into a cupy.cuda.Graph; None (logged) if capture fails."""
    import cupy  # noqa: PLC0415 - optional dependency

    stream.begin_capture(mode=cupy.cuda.runtime.streamCaptureModeThreadLocal)
    try:
        enqueue()
    except Exception as e:  # noqa: BLE001 - any failure means: no graph, run eagerly
        try:
            stream.end_capture()
        except Exception:  # noqa: BLE001 - the capture is already invalid
            pass
        _clear_sticky_error()
        log.warning("%s: CUDA graph capture failed (%s); running eagerly", what, e)
        return None
    try:
        graph = stream.end_capture()
    except Exception as e:  # noqa: BLE001
        _clear_sticky_error()
        log.warning("%s: CUDA graph capture failed at end_capture (%s); running eagerly", what, e)
        return None
    return graph
