"""Per-instance IO buffers: one CuPy device buffer and one pinned host mirror per tensor, allocated once.

Why this shape (shared/reference/tensorrt-api.md §4.5, §6.3):
- device buffers are sized for the profile's max shape and never resized, so TensorRT tensor addresses and
  captured CUDA graphs stay valid for the instance's life; at least 512 bytes each, so an address is never 0
  (CuPy returns ptr 0 for a 0-byte allocation: the "bindings[x] || nullBindingOK" failure);
- copies go through pinned memory with ``cudaMemcpyAsync`` on the instance's own stream: CuPy's
  ``copy_from_host``/``copy_to_host`` use the legacy default stream and would serialize every instance;
- the pinned mirror comes in ``slots`` copies (one per batch an instance may have in flight), so the next batch
  is packed while the previous one still copies in and out of its own mirror. One device buffer is enough:
  every batch of an instance runs on the instance's one stream, so device reads and writes are stream-ordered.
CuPy is imported lazily: this module imports on a machine without CUDA.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from trtserve.server.engine.backends.base import DeviceTensor, PieceColumns
from trtserve.server.engine.backends.tensorrt import copies
from trtserve.server.engine.backends.tensorrt import pieces

MIN_BYTES = 512  # CuPy's allocation unit; also keeps TensorRT's 256-byte address alignment


def _cupy() -> Any:
    import cupy  # noqa: PLC0415 - optional dependency

    return cupy


def is_page_locked(ptr: int) -> bool:
    """Whether host address ``ptr`` lies in memory registered with (or allocated by) CUDA as page-locked."""
    rt = _cupy().cuda.runtime
    try:
        return int(rt.pointerGetAttributes(ptr).type) == int(getattr(rt, "memoryTypeHost", 1))  # cudaMemoryTypeHost
    except Exception:  # noqa: BLE001 - an address CUDA does not know: plain pageable memory
        return False


class PageLockedOwners:
    """``is_page_locked`` remembered per memory owner: a request's input is a view of its front end's whole arena
    (one NumPy array per arena and dtype), so asking CUDA once per arena replaces a driver call per input per
    batch. Only speed depends on the answer: a copy from pageable memory is still correct, just synchronous, so an
    owner whose registration changed later costs time, not data."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: Dict[int, Tuple[Any, bool]] = {}  # id(owner) -> (weak reference to it, page-locked)

    def __call__(self, array: np.ndarray, ptr: int) -> bool:
        owner = array.base
        if type(owner) is not np.ndarray:  # owns its memory, or a view of something that is not an array
            return is_page_locked(ptr)
        hit = self._known.get(id(owner))
        if hit is not None and hit[0]() is owner:
            return hit[1]
        locked = is_page_locked(ptr)
        if len(self._known) >= 64:  # arenas come and go with front ends: keep it small
            self._known.clear()
        self._known[id(owner)] = (weakref.ref(owner), locked)
        return locked


def nbytes_of(shape: Tuple[int, ...], dtype: np.dtype) -> int:
    n = dtype.itemsize
    for d in shape:  # a plain loop: np.prod costs microseconds per call on the hot path
        n *= int(d)
    return n


class StagedTensor:
    """One IO tensor of one instance: ``capacity`` bytes on the device and ``slots`` pinned host mirrors of it.
    Every host-side method takes the mirror (``slot``) the batch owns."""

    def __init__(self, name: str, dtype: np.dtype, max_shape: Tuple[int, ...], slots: int = 1) -> None:
        cupy = _cupy()
        self.name = name
        self.dtype = np.dtype(dtype)
        self.max_shape = tuple(max_shape)
        self.capacity = nbytes_of(self.max_shape, self.dtype)
        size = max(self.capacity, MIN_BYTES)
        self.device = cupy.empty(size, dtype=cupy.uint8)
        self._ptr = int(self.device.data.ptr)
        self._pinned = [cupy.cuda.alloc_pinned_memory(size) for _ in range(max(1, slots))]  # keeps them alive
        self.hosts = [np.frombuffer(p, dtype=np.uint8, count=size) for p in self._pinned]
        self._host_ptrs = [int(h.ctypes.data) for h in self.hosts]  # .ctypes builds an object per access
        # per slot: where the next upload reads, when the input already lies in page-locked memory (a front end's
        # arena the engine registered with CUDA); 0: the slot's own pinned mirror
        self._direct = [0] * max(1, slots)
        self._page_locked = PageLockedOwners()
        if self.ptr == 0 or self.ptr % 256:
            raise RuntimeError(f"tensor '{name}': device buffer address {self.ptr:#x} is null or not 256-byte aligned")

    @property
    def ptr(self) -> int:
        return self._ptr

    def pack(self, array: np.ndarray, pad_to_bytes: int = 0, slot: int = 0) -> int:
        """Copies ``array`` into pinned mirror ``slot`` (zero-filling up to ``pad_to_bytes``); returns its bytes.
        An array of another integer type (INT64 served on an INT32 engine input, its range checked per request)
        is converted on the way."""
        n = array.size * self.dtype.itemsize
        if n > self.capacity or pad_to_bytes > self.capacity:
            raise ValueError(f"tensor '{self.name}': {max(n, pad_to_bytes)} bytes exceed the buffer's {self.capacity}")
        host = self.hosts[slot]
        self._direct[slot] = 0
        ptr = array.__array_interface__["data"][0]
        if ptr != self._host_ptrs[slot]:  # else stacked in place (see view)
            if (n and not pad_to_bytes and array.dtype == self.dtype and array.flags.c_contiguous
                    and self._page_locked(array, ptr)):
                self._direct[slot] = ptr  # the device copy reads it where it is
                return n
            dst = host[:n].view(self.dtype).reshape(array.shape)
            np.copyto(dst, array, casting="no" if array.dtype == self.dtype else "unsafe")
        if pad_to_bytes > n:
            host[n:pad_to_bytes] = 0
        return n

    def view(self, shape: Tuple[int, ...], slot: int = 0) -> np.ndarray:
        """Pinned mirror ``slot`` as an array of ``shape``, to be filled in place before ``pack``."""
        n = nbytes_of(shape, self.dtype)
        if n > self.capacity:
            raise ValueError(f"tensor '{self.name}': {n} bytes exceed the buffer's {self.capacity}")
        return self.hosts[slot][:n].view(self.dtype).reshape(shape)

    def upload(self, nbytes: int, stream: Any, slot: int = 0) -> None:
        """Enqueues pinned mirror ``slot`` -> device for the first ``nbytes`` on ``stream``."""
        if nbytes:
            cupy = _cupy()
            cupy.cuda.runtime.memcpyAsync(
                self.ptr, self._direct[slot] or self._host_ptrs[slot], nbytes, cupy.cuda.runtime.memcpyHostToDevice,
                stream.ptr)

    def gather(self, parts: Sequence[Any], stream: Any, slot: int = 0,
               copier: Optional[pieces.PieceCopier] = None) -> int:
        """Enqueues each piece into its rows of the device buffer on ``stream``: device pieces (objects with
        ``__cuda_array_interface__``, e.g. a client's CUDA shared memory) device to device, host pieces in
        page-locked memory (a front end's arena) straight from there, other host pieces through their place in
        the pinned mirror; pieces that lie at a fixed distance from each other go in one call (copies.py), and
        device pieces in one kernel launch where ``copier`` (a pieces.PieceCopier) takes them. Returns the bytes
        written."""
        if copier is not None and len(parts) >= pieces.MIN_PIECES:
            done = self._gather_shm(parts, stream, copier)
            if done is not None:
                return done
        cupy = _cupy()
        rt = cupy.cuda.runtime
        host, host_ptr = self.hosts[slot], self._host_ptrs[slot]
        offset = 0
        from_host: List[copies.Copy] = []  # enqueued after the loop; the block is where the source lies
        from_device: List[copies.Copy] = []
        for p in parts:
            # CUDA shared memory comes as DeviceTensor, C-contiguous by construction: its address is read directly,
            # without building its array interface for every member of every batch
            shm = type(p) is DeviceTensor
            cai = None if shm else getattr(p, "__cuda_array_interface__", None)
            n = int(p.nbytes) // np.dtype(p.dtype).itemsize * self.dtype.itemsize  # bytes in this buffer's type
            if offset + n > self.capacity:
                raise ValueError(f"tensor '{self.name}': {offset + n} bytes exceed the buffer's {self.capacity}")
            if shm or cai is not None:
                if cai is not None and cai.get("strides") is not None:
                    raise ValueError(f"tensor '{self.name}': a device piece must be C-contiguous")
                if n and np.dtype(p.dtype) != self.dtype:  # INT64 -> INT32: converted on the device, on the stream
                    dst = self.device[offset:offset + n].view(self.dtype).reshape(tuple(p.shape))
                    with stream:
                        cupy.copyto(dst, cupy.asarray(p), casting="unsafe")
                elif n:
                    # each alone: nothing says two clients' regions share an allocation
                    from_device.append((self.ptr + offset, p.ptr if shm else int(cai["data"][0]), n, id(p)))
            elif (n and p.dtype == self.dtype and p.flags.c_contiguous
                  and self._page_locked(p, src_ptr := p.__array_interface__["data"][0])):
                from_host.append((self.ptr + offset, src_ptr, n, copies.block_of(p)))
            else:
                src = np.ascontiguousarray(p)
                np.copyto(host[offset:offset + n].view(self.dtype).reshape(src.shape), src,
                          casting="no" if src.dtype == self.dtype else "unsafe")
                from_host.append((self.ptr + offset, host_ptr + offset, n, id(host)))
            offset += n
        copies.enqueue(rt, from_host, rt.memcpyHostToDevice, stream.ptr)
        if from_device and (copier is None or not copier.copy(from_device, stream)):
            copies.enqueue(rt, from_device, rt.memcpyDeviceToDevice, stream.ptr)
        return offset

    def gather_columns(self, columns: PieceColumns, stream: Any) -> int:
        """``gather`` of host pieces of this tensor's type given as columns (a group of large requests, each piece
        in page-locked memory): the copies are planned from the addresses, a run of pieces at one distance in one
        call (copies.py). Returns the bytes written."""
        count, n = len(columns), columns.nbytes
        if count * n > self.capacity:
            raise ValueError(f"tensor '{self.name}': {count * n} bytes exceed the buffer's {self.capacity}")
        rt = _cupy().cuda.runtime
        dst = self.ptr + np.arange(count, dtype=np.int64) * n
        copies.enqueue_columns(rt, dst, columns.addresses, n, columns.blocks, rt.memcpyHostToDevice, stream.ptr)
        return count * n

    def _gather_shm(self, parts: Sequence[Any], stream: Any, copier: pieces.PieceCopier) -> Optional[int]:
        """``gather`` of a group in CUDA shared memory (every piece a DeviceTensor of this tensor's type) as one
        launch, the table built a column at a time; None, with nothing enqueued, for any other batch (the general
        path then takes it)."""
        dtype = self.dtype
        for p in parts:
            if type(p) is not DeviceTensor or p.dtype != dtype:
                return None
        sizes = [p.nbytes for p in parts]
        ends = list(itertools.accumulate(sizes))
        if ends[-1] > self.capacity:
            raise ValueError(f"tensor '{self.name}': {ends[-1]} bytes exceed the buffer's {self.capacity}")
        base = self.ptr
        dst = [base + end - n for end, n in zip(ends, sizes)]
        if not copier.copy_columns(dst, [p.ptr for p in parts], sizes, stream):
            return None
        return ends[-1]

    def download(self, nbytes: int, stream: Any, slot: int = 0) -> None:
        """Enqueues device -> pinned mirror ``slot`` for the first ``nbytes`` on ``stream``."""
        if nbytes > self.capacity:
            raise ValueError(f"tensor '{self.name}': {nbytes} bytes exceed the buffer's {self.capacity}")
        if nbytes:
            cupy = _cupy()
            cupy.cuda.runtime.memcpyAsync(
                self._host_ptrs[slot], self.ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr
            )

    def result(self, shape: Tuple[int, ...], slot: int = 0, as_dtype: Optional[np.dtype] = None) -> np.ndarray:
        """A fresh array with the downloaded data (the pinned mirror is reused by a later batch), converted to
        ``as_dtype`` when given (INT32 engine output served as INT64: widened, exact)."""
        n = nbytes_of(shape, self.dtype)
        data = self.hosts[slot][:n].view(self.dtype).reshape(shape)
        return data.copy() if as_dtype is None else data.astype(as_dtype)

    def free(self) -> None:
        """Drops the buffers (CuPy returns them to its pools)."""
        self.device = None
        self.hosts = []
        self._pinned = []
