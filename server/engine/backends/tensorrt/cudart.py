"""The CUDA runtime calls of a batch's enqueue and collect, made with the GIL held.

CuPy's bindings let the GIL go around every CUDA call. In the engine process one thread, the event loop, enqueues
every batch, and each call that lets the GIL go is a moment in which an instance's completion thread takes it; the
loop then waits to get it back, often longer than the call took. The calls here only queue work on a stream
(copies, event records) or read a finished batch's event times, and return in microseconds, so they keep the GIL.
Measured without a GPU (bench/engine_fake_gpu.py, whose stand-in calls either keep the GIL or let it go): the
enqueue of a heavy batch took about a quarter less time when its short calls kept the GIL. Waiting for the device
still lets the GIL go (CuPy's synchronize, on the completion thread).

The library is the CUDA runtime CuPy loaded (the same shared object, found by its name), so contexts, streams and
events are shared with CuPy. Imported only where CUDA is.
"""
from __future__ import annotations

import ctypes
from typing import Any

# cudaMemcpyKind
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE, DEFAULT = 1, 2, 3, 4

_LIBRARIES = ("libcudart.so.12", "libcudart.so.11.0", "libcudart.so")


class CudaCallError(RuntimeError):
    """A CUDA runtime call returned an error (named as CUDA names it)."""


class Runtime:
    """cudaMemcpyAsync, cudaEventRecord and cudaEventElapsedTime through ``ctypes.PyDLL``: the GIL stays held."""

    def __init__(self, lib: Any) -> None:
        c_void_p, c_int = ctypes.c_void_p, ctypes.c_int
        self._memcpy = lib.cudaMemcpyAsync
        self._memcpy.argtypes = [c_void_p, c_void_p, ctypes.c_size_t, c_int, c_void_p]
        self._memcpy.restype = c_int
        self._record = lib.cudaEventRecord
        self._record.argtypes = [c_void_p, c_void_p]
        self._record.restype = c_int
        self._elapsed = lib.cudaEventElapsedTime
        self._elapsed.argtypes = [ctypes.POINTER(ctypes.c_float), c_void_p, c_void_p]
        self._elapsed.restype = c_int
        self._clear = lib.cudaGetLastError
        self._clear.argtypes = []
        self._clear.restype = c_int
        self._name = lib.cudaGetErrorName
        self._name.argtypes = [c_int]
        self._name.restype = ctypes.c_char_p
        self._ms = ctypes.c_float()
        self._ms_ref = ctypes.byref(self._ms)

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        """Queues a copy of ``nbytes`` on ``stream`` (``kind``: HOST_TO_DEVICE, ... or DEFAULT, which the
        addresses decide)."""
        status = self._memcpy(dst, src, nbytes, kind, stream)
        if status:
            raise self._error("cudaMemcpyAsync", status)

    def record(self, event: int, stream: int) -> None:
        status = self._record(event, stream)
        if status:
            raise self._error("cudaEventRecord", status)

    def elapsed_ms(self, start: int, end: int) -> float:
        """Milliseconds between two recorded events, both complete."""
        status = self._elapsed(self._ms_ref, start, end)
        if status:
            raise self._error("cudaEventElapsedTime", status)
        return float(self._ms.value)

    def clear_last_error(self) -> None:
        """cudaGetLastError: a failed call's error stays the runtime's "last error" until read, and later callers
        (TensorRT, CuPy) must not take it for their own."""
        self._clear()

    def _error(self, call: str, status: int) -> CudaCallError:
        self._clear()
        name = self._name(status)
        return CudaCallError(f"{call} failed: {name.decode() if name else 'CUDA error'} ({status})")


def load() -> Runtime:
    """The runtime CuPy loaded, with the GIL kept around its calls; OSError if none can be loaded."""
    for name in _LIBRARIES:
        try:
            return Runtime(ctypes.PyDLL(name))
        except OSError:
            continue
    raise OSError(f"none of {', '.join(_LIBRARIES)} could be loaded")
