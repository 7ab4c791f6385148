"""The two kinds of client region: a window of a POSIX shared-memory object (system) and a peer's
device allocation opened through its CUDA IPC handle.

A system region is never mapped into the server. It keeps one file descriptor on the object and
reads inputs with ``preadv`` / writes outputs with ``pwritev``. The client owns the object and may
shrink it at any time (``ftruncate``); touching a mapped page past the new end raises SIGBUS and
kills the whole server, whatever size check came before (the check and the access can never be
atomic). A read or write of a file descriptor cannot fault: a read past the end comes back short
(answered as InvalidArgument), and a write is refused when the object is smaller than the window
it would write. Inputs are therefore copies held in the server's own memory, which the client
cannot truncate; the copy is what a mapping would have cost in page faults anyway, and the batcher
concatenates (copies) multi-request batches in any case. One descriptor per region, no mapping:
see SharedMemoryRegistry's ``max_regions`` for the cap on their number.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple, Union

import numpy as np

from trtserve.server.engine.shm.cuda import CudaApi
from trtserve.server.errors import InvalidArgument, NotFound

log = logging.getLogger("trtserve.shm")


def _open_posix_shm(key: str) -> int:
    """fd of an existing POSIX shared-memory object, read-write (outputs are written into it)."""
    name = key.lstrip("/")
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise InvalidArgument(f"shared memory key {key!r} is not a POSIX shared-memory name (one path "
                              "component, optionally with a leading '/')")
    try:
        import _posixshmem  # CPython's shm_open, used by multiprocessing.shared_memory

        return _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except ImportError:  # a Python without it: Linux keeps POSIX shm objects in /dev/shm
        pass
    except FileNotFoundError:
        raise InvalidArgument(f"no shared memory object with key {key!r}; create it before registering") from None
    except OSError as e:
        raise InvalidArgument(f"cannot open shared memory key {key!r}: {e.strerror}") from None
    try:
        return os.open(os.path.join("/dev/shm", name), os.O_RDWR)
    except FileNotFoundError:
        raise InvalidArgument(f"no shared memory object with key {key!r}; create it before registering") from None
    except OSError as e:
        raise InvalidArgument(f"cannot open shared memory key {key!r}: {e.strerror}") from None


def writable_bytes(out: Any, byte_size: int, what: str) -> np.ndarray:
    """``out`` (any writable, C-contiguous buffer: a NumPy array, a bytearray, a memoryview of an arena)
    as a flat uint8 array over the same memory; it must hold exactly ``byte_size`` bytes."""
    try:
        flat = np.frombuffer(out, dtype=np.uint8) if memoryview(out).nbytes else np.empty(0, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as e:
        raise ValueError(f"{what}: out must be a C-contiguous buffer: {e}") from None
    if not flat.flags.writeable:
        raise ValueError(f"{what}: out is read-only")
    if flat.nbytes != byte_size:
        raise ValueError(f"{what}: out has {flat.nbytes} bytes, the read needs {byte_size}")
    return flat


class _Region:
    """Bookkeeping shared by both kinds: name, size, and the requests currently using it."""

    kind = ""

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.byte_size = byte_size
        self.leases = 0
        self.unregistered = False

    def check(self, offset: int, byte_size: int, what: str) -> None:
        """The request's [offset, offset + byte_size) must lie inside the region."""
        if offset < 0 or byte_size < 0:
            raise InvalidArgument(f"{what}: shared memory offset {offset} and byte size {byte_size} must be >= 0")
        if offset + byte_size > self.byte_size:
            raise InvalidArgument(f"{what}: offset {offset} + byte size {byte_size} = {offset + byte_size} is past "
                                  f"the end of {self.kind} shared memory region '{self.name}' ({self.byte_size} bytes)")

    def identity(self) -> Tuple[Any, int]:
        """(the memory object, where this region starts in it): two regions with the same object alias."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SystemRegion(_Region):
    """The window [offset, offset + byte_size) of a POSIX shared-memory object, read and written
    through one file descriptor (never mapped: see the module docstring)."""

    kind = "system"

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        super().__init__(name, byte_size)
        self.key = key
        self.offset = offset
        self._fd = _open_posix_shm(key)
        try:
            size = os.fstat(self._fd).st_size
            if offset < 0 or byte_size <= 0 or offset + byte_size > size:
                raise InvalidArgument(f"failed to register shared memory region '{name}': offset {offset} + byte "
                                      f"size {byte_size} does not fit key {key!r} ({size} bytes); byte size must "
                                      "be > 0")
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def identity(self) -> Tuple[Any, int]:
        return ("system", self.key.lstrip("/")), self.offset

    def _live_fd(self, what: str) -> int:
        fd = self._fd
        if fd < 0:
            raise NotFound(f"{what}: system shared memory region '{self.name}' has been unregistered")
        return fd

    def _shrunk(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"{what}: the shared memory object {self.key!r} behind region '{self.name}' was "
                               "shrunk after registration; register it again")

    def read(self, offset: int, byte_size: int, what: str, out: Any = None) -> np.ndarray:
        """A copy of [offset, offset + byte_size) of the region as a flat uint8 array, after bounds checks.

        Into a fresh array (NumPy's allocation: aligned for every tensor datatype) or, with ``out``,
        into that writable buffer of exactly ``byte_size`` bytes (returned as a uint8 array over it).
        An object shrunk below the window since registration gives InvalidArgument, never a fault.
        """
        self.check(offset, byte_size, what)
        fd = self._live_fd(what)
        dst = np.empty(byte_size, dtype=np.uint8) if out is None else writable_bytes(out, byte_size, what)
        view = memoryview(dst)
        start = self.offset + offset
        done = 0
        while done < byte_size:  # one call unless the kernel splits it (reads are capped near 2 GiB)
            try:
                n = os.preadv(fd, [view[done:]], start + done)
            except OSError as e:
                raise InvalidArgument(f"{what}: cannot read shared memory region '{self.name}': "
                                      f"{e.strerror or e}") from None
            if n <= 0:  # end of the object: it is smaller than when it was registered
                raise self._shrunk(what)
            done += n
        return dst

    def write(self, offset: int, data: Any, what: str) -> None:
        """Writes the bytes of ``data`` (a C-contiguous array or bytes-like object) at ``offset``.

        Refused when the object is now smaller than the window written, so the server never grows
        (or faults on) a client's object. A client that shrinks it between that check and the write
        only gets its object extended by a hole, back to at most the registered size; no crash.
        """
        nbytes = memoryview(data).nbytes
        self.check(offset, nbytes, what)
        fd = self._live_fd(what)
        start = self.offset + offset
        if nbytes == 0:
            return
        src = np.frombuffer(data, dtype=np.uint8)  # C-contiguous or ValueError
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise InvalidArgument(f"{what}: cannot inspect shared memory region '{self.name}': "
                                  f"{e.strerror or e}") from None
        if size < start + nbytes:
            raise self._shrunk(what)
        view = memoryview(src)
        done = 0
        while done < nbytes:
            try:
                n = os.pwritev(fd, [view[done:]], start + done)
            except OSError as e:
                raise InvalidArgument(f"{what}: writing {nbytes} bytes into shared memory region '{self.name}' "
                                      f"failed after {done}: {e.strerror or e}") from None
            if n <= 0:
                raise InvalidArgument(f"{what}: writing {nbytes} bytes into shared memory region '{self.name}' "
                                      f"stopped after {done}")
            done += n

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class CudaRegion(_Region):
    """A peer process's device allocation, opened through its cudaIpcMemHandle_t."""

    kind = "CUDA"

    def __init__(self, name: str, raw_handle: bytes, device_id: int, byte_size: int, api: CudaApi) -> None:
        super().__init__(name, byte_size)
        self.raw_handle = bytes(raw_handle)
        self.device_id = device_id
        self._api = api
        self.ptr: Optional[int] = None

    @property
    def api(self) -> CudaApi:
        return self._api

    def open(self) -> None:
        """Opens the IPC handle and checks the size against the real allocation when the driver says it."""
        try:
            self.ptr = self._api.open_handle(self.raw_handle, self.device_id)
        except Exception as e:  # CuPy raises CUDARuntimeError; the message names the CUDA error
            raise InvalidArgument(f"failed to register CUDA shared memory region '{self.name}': cannot open the "
                                  f"IPC handle on device {self.device_id}: {e}") from None
        real = self._api.allocation_size(self.ptr, self.device_id)
        if real is None:
            log.warning("CUDA region '%s': allocation size unknown (no cuMemGetAddressRange); trusting byte_size %d",
                        self.name, self.byte_size)
        elif self.byte_size > real:
            self.close()
            raise InvalidArgument(f"failed to register CUDA shared memory region '{self.name}': byte size "
                                  f"{self.byte_size} exceeds the allocation behind the handle ({real} bytes)")

    def identity(self) -> Tuple[Any, int]:
        return ("cuda", self.raw_handle), 0

    def address(self, offset: int, byte_size: int, what: str) -> int:
        """Device address of [offset, offset + byte_size), after bounds checks."""
        self.check(offset, byte_size, what)
        if self.ptr is None:
            raise NotFound(f"{what}: CUDA shared memory region '{self.name}' has been unregistered")
        return self.ptr + offset

    def close(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            try:
                self._api.close_handle(ptr, self.device_id)
            except Exception:  # the peer may be gone already; nothing else can be done
                log.exception("closing CUDA IPC handle of region '%s'", self.name)


Region = Union[SystemRegion, CudaRegion]

__all__ = ["CudaRegion", "Region", "SystemRegion", "writable_bytes"]
