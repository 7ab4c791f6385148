"""Per-instance IO buffers: one CuPy device buffer and one pinned host mirror per tensor, allocated once.

Why this shape (shared/reference/tensorrt-api.md §4.5, §6.3):
- device buffers are sized for the profile's max shape and never resized, so TensorRT tensor addresses and
  captured CUDA graphs stay valid for the instance's life; at least 512 bytes each, so an address is never 0
  (CuPy returns ptr 0 for a 0-byte allocation: the "bindings[x] || nullBindingOK" failure);
- copies go through pinned memory with ``cudaMemcpyAsync`` on the instance's own stream: CuPy's
  ``copy_from_host``/``copy_to_host`` use the legacy default stream and would serialize every instance.
CuPy is imported lazily: this module imports on a machine without CUDA.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

MIN_BYTES = 512  # CuPy's allocation unit; also keeps TensorRT's 256-byte address alignment


def _cupy() -> Any:
    import cupy  # noqa: PLC0415 - optional dependency

    return cupy


def nbytes_of(shape: Tuple[int, ...], dtype: np.dtype) -> int:
    n = dtype.itemsize
    for d in shape:  # a plain loop: np.prod costs microseconds per call on the hot path
        n *= int(d)
    return n


class StagedTensor:
    """One IO tensor of one instance: ``capacity`` bytes on the device and the same in pinned host memory."""

    def __init__(self, name: str, dtype: np.dtype, max_shape: Tuple[int, ...]) -> None:
        cupy = _cupy()
        self.name = name
        self.dtype = np.dtype(dtype)
        self.max_shape = tuple(max_shape)
        self.capacity = nbytes_of(self.max_shape, self.dtype)
        size = max(self.capacity, MIN_BYTES)
        self.device = cupy.empty(size, dtype=cupy.uint8)
        self._ptr = int(self.device.data.ptr)
        self._pinned = cupy.cuda.alloc_pinned_memory(size)  # keeps the pinned block alive
        self.host = np.frombuffer(self._pinned, dtype=np.uint8, count=size)
        self._host_ptr = int(self.host.ctypes.data)  # .ctypes builds an object per access: read it once
        if self.ptr == 0 or self.ptr % 256:
            raise RuntimeError(f"tensor '{name}': device buffer address {self.ptr:#x} is null or not 256-byte aligned")

    @property
    def ptr(self) -> int:
        return self._ptr

    def pack(self, array: np.ndarray, pad_to_bytes: int = 0) -> int:
        """Copies ``array`` into the pinned mirror (zero-filling up to ``pad_to_bytes``); returns its bytes."""
        n = array.nbytes
        if n > self.capacity or pad_to_bytes > self.capacity:
            raise ValueError(f"tensor '{self.name}': {max(n, pad_to_bytes)} bytes exceed the buffer's {self.capacity}")
        if array.__array_interface__["data"][0] != self._host_ptr:  # else stacked in place (see view)
            dst = self.host[:n].view(self.dtype).reshape(array.shape)
            np.copyto(dst, array, casting="no")
        if pad_to_bytes > n:
            self.host[n:pad_to_bytes] = 0
        return n

    def view(self, shape: Tuple[int, ...]) -> np.ndarray:
        """The pinned mirror as an array of ``shape``, to be filled in place before ``pack``."""
        n = nbytes_of(shape, self.dtype)
        if n > self.capacity:
            raise ValueError(f"tensor '{self.name}': {n} bytes exceed the buffer's {self.capacity}")
        return self.host[:n].view(self.dtype).reshape(shape)

    def upload(self, nbytes: int, stream: Any) -> None:
        """Enqueues pinned -> device for the first ``nbytes`` on ``stream``."""
        if nbytes:
            cupy = _cupy()
            cupy.cuda.runtime.memcpyAsync(
                self.ptr, self._host_ptr, nbytes, cupy.cuda.runtime.memcpyHostToDevice, stream.ptr
            )

    def gather(self, parts: Sequence[Any], stream: Any) -> int:
        """Enqueues each piece into its rows of the device buffer on ``stream``: device pieces (objects with
        ``__cuda_array_interface__``, e.g. a client's CUDA shared memory) device to device, host pieces
        through their place in the pinned mirror. Returns the bytes written."""
        cupy = _cupy()
        rt = cupy.cuda.runtime
        offset = 0
        for p in parts:
            cai = getattr(p, "__cuda_array_interface__", None)
            n = int(p.nbytes)
            if offset + n > self.capacity:
                raise ValueError(f"tensor '{self.name}': {offset + n} bytes exceed the buffer's {self.capacity}")
            if cai is not None:
                if cai.get("strides") is not None:
                    raise ValueError(f"tensor '{self.name}': a device piece must be C-contiguous")
                if n:
                    rt.memcpyAsync(self.ptr + offset, int(cai["data"][0]), n, rt.memcpyDeviceToDevice, stream.ptr)
            else:
                src = np.ascontiguousarray(p)
                np.copyto(self.host[offset:offset + n].view(self.dtype).reshape(src.shape), src, casting="no")
                if n:
                    rt.memcpyAsync(self.ptr + offset, self._host_ptr + offset, n, rt.memcpyHostToDevice, stream.ptr)
            offset += n
        return offset

    def download(self, nbytes: int, stream: Any) -> None:
        """Enqueues device -> pinned for the first ``nbytes`` on ``stream``."""
        if nbytes > self.capacity:
            raise ValueError(f"tensor '{self.name}': {nbytes} bytes exceed the buffer's {self.capacity}")
        if nbytes:
            cupy = _cupy()
            cupy.cuda.runtime.memcpyAsync(
                self._host_ptr, self.ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr
            )

    def result(self, shape: Tuple[int, ...]) -> np.ndarray:
        """A fresh array with the downloaded data (the pinned mirror is reused by the next batch)."""
        n = nbytes_of(shape, self.dtype)
        return self.host[:n].view(self.dtype).reshape(shape).copy()

    def free(self) -> None:
        """Drops the buffers (CuPy returns them to its pools)."""
        self.device = None
        self.host = None  # type: ignore[assignment]
        self._pinned = None
