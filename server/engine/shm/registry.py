"""Triton's shared-memory extensions: a registry of system (POSIX) and CUDA regions, and the
per-request reads and writes that go through them.

A client registers a region once (name -> POSIX key or CUDA IPC handle, with offset and size); then
inputs and outputs of any request name the region instead of carrying bytes. Region names share
one namespace across both kinds, as in Triton. Everything a request touches is checked against the
registered region first, so a request can never read or write outside it.

Status codes follow Triton's shared_memory_manager.cc: duplicate name ALREADY_EXISTS, a region
name no one registered NOT_FOUND, any bad use (offset, size, datatype, overlap, device)
INVALID_ARGUMENT. Unregistering an unknown name succeeds (perf_analyzer unregisters everything
first). A region unregistered while requests use it stays mapped until they finish (Triton's
``awaiting_unregister_``), but new requests cannot name it any more.

Inputs read from a system region are zero-copy, read-only NumPy views of the mapping; see
``SharedMemoryRegistry.read_input`` for why that is safe. CuPy is imported only when a CUDA region
is registered, so the module works on machines without CUDA.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import math
import mmap
import os
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from trtserve import dtypes
from trtserve.server.errors import AlreadyExists, Internal, InvalidArgument, NotFound, Unavailable

log = logging.getLogger("trtserve.shm")

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
CUDA_IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_FORGOTTEN_NAMES = 1024  # unregistered names remembered, only to word "reuse after unregister" errors


# ---- CUDA access (CuPy), behind a small interface so the registry is testable without a GPU ------------------------

class CudaApi:
    """The CUDA calls the registry makes; the real one uses CuPy's runtime bindings.

    Every call names the device it runs on, because an IPC mapping and the copies that touch it
    must happen in that device's context.
    """

    def device_count(self) -> int:
        """GPUs visible to this process; 0 when CUDA is unusable."""
        cp = self._cupy()
        return int(cp.cuda.runtime.getDeviceCount())

    def open_handle(self, raw_handle: bytes, device_id: int) -> int:
        """Maps a peer process's allocation; returns its device pointer in this process."""
        cp = self._cupy()
        with cp.cuda.Device(device_id):
            return int(cp.cuda.runtime.ipcOpenMemHandle(bytes(raw_handle)))  # flags: cudaIpcMemLazyEnablePeerAccess

    def close_handle(self, ptr: int, device_id: int) -> None:
        cp = self._cupy()
        with cp.cuda.Device(device_id):
            cp.cuda.runtime.ipcCloseMemHandle(ptr)

    def allocation_size(self, ptr: int, device_id: int) -> Optional[int]:
        """Bytes from ``ptr`` to the end of its allocation (cuMemGetAddressRange), None if unknown.

        CuPy does not wrap cuMemGetAddressRange, so this asks the driver library directly; when
        that fails the client's byte_size is trusted, as the log says.
        """
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuMemGetAddressRange_v2
            base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
            cp = self._cupy()
            with cp.cuda.Device(device_id):
                rc = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
            if rc != 0:
                return None
            return int(base.value) + int(size.value) - ptr
        except (OSError, AttributeError):
            return None

    def copy(self, dst: int, src: int, nbytes: int, device_id: int) -> None:
        """Synchronous copy between any two addresses (unified addressing: host, device or IPC)."""
        cp = self._cupy()
        with cp.cuda.Device(device_id):
            cp.cuda.runtime.memcpy(dst, src, nbytes, cp.cuda.runtime.memcpyDefault)

    @staticmethod
    def _cupy() -> Any:
        import cupy  # lazy: only servers that see CUDA regions pay for (or need) CuPy

        return cupy


# ---- regions -------------------------------------------------------------------------------------------------------

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
    """A mapped window [offset, offset + byte_size) of a POSIX shared-memory object."""

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
            # mmap offsets must be page-aligned: map from the page start and remember the distance
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._delta = offset - start
            self._mmap: Optional[mmap.mmap] = mmap.mmap(self._fd, self._delta + byte_size, mmap.MAP_SHARED,
                                                        mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except BaseException:
            os.close(self._fd)
            raise

    def identity(self) -> Tuple[Any, int]:
        return ("system", self.key.lstrip("/")), self.offset

    def buffer(self, offset: int, byte_size: int, what: str) -> np.ndarray:
        """uint8 view of [offset, offset + byte_size) of the region, after bounds checks.

        The object's current size is checked too: touching pages past the end of a shm object that
        its owner shrank after registration would kill the server with SIGBUS.
        """
        self.check(offset, byte_size, what)
        if self._mmap is None:
            raise NotFound(f"{what}: system shared memory region '{self.name}' has been unregistered")
        if os.fstat(self._fd).st_size < self.offset + offset + byte_size:
            raise InvalidArgument(f"{what}: the shared memory object {self.key!r} behind region '{self.name}' "
                                  "was shrunk after registration; register it again")
        return np.frombuffer(self._mmap, dtype=np.uint8, count=byte_size, offset=self._delta + offset)

    def close(self) -> None:
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # a finished request's NumPy view is still alive somewhere: the mapping goes away with
                # the last view (mmap unmaps on deallocation), never while one can still read it
                pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class CudaRegion(_Region):
    """A peer process's device allocation, opened through its cudaIpcMemHandle_t."""

    kind = "CUDA"

    def __init__(self, name: str, raw_handle: bytes, device_id: int, byte_size: int, api: CudaApi) -> None:
        super().__init__(name, byte_size)
        self.raw_handle = bytes(raw_handle)
        self.device_id = device_id
        self._api = api
        self.ptr: Optional[int] = None

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


# ---- what a request carries ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShmRef:
    """The three parameters of one input or output: which region, where in it, how many bytes."""

    region: str
    offset: int
    byte_size: int


def _int_param(p: Any, key: str, what: str) -> int:
    which = p.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{what}: parameter '{key}' must be an integer (int64 or uint64), got {which}")
    value = int(getattr(p, which))
    if value < 0:
        raise InvalidArgument(f"{what}: parameter '{key}' must be >= 0, got {value}")
    return value


def shm_ref(parameters: Mapping[str, Any], what: str) -> Optional[ShmRef]:
    """The tensor's shared-memory parameters, or None when it names no region."""
    if REGION not in parameters:
        for key in (OFFSET, BYTE_SIZE):
            if key in parameters:
                raise InvalidArgument(f"{what}: parameter '{key}' without '{REGION}'")
        return None
    p = parameters[REGION]
    if p.WhichOneof("parameter_choice") != "string_param" or not p.string_param:
        raise InvalidArgument(f"{what}: parameter '{REGION}' must be a non-empty string")
    if BYTE_SIZE not in parameters:
        raise InvalidArgument(f"{what}: parameter '{BYTE_SIZE}' is required with '{REGION}'")
    offset = _int_param(parameters[OFFSET], OFFSET, what) if OFFSET in parameters else 0
    return ShmRef(p.string_param, offset, _int_param(parameters[BYTE_SIZE], BYTE_SIZE, what))


@dataclasses.dataclass(frozen=True)
class DeviceTensor:
    """An input that stays in a client's CUDA region: what a backend with ``accepts_device_tensors``
    receives instead of a NumPy array (see docs/shared-memory.md).

    ``__cuda_array_interface__`` makes ``cupy.asarray(t)`` a zero-copy view; the backend must copy
    it (device to device, on its own stream) before the request's answer is sent, because the
    mapping is only guaranteed until then.
    """

    ptr: int
    nbytes: int
    shape: Tuple[int, ...]
    dtype: np.dtype
    device_id: int
    region: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, True), "version": 3,
                "strides": None}


# ---- the registry --------------------------------------------------------------------------------------------------

class SharedMemoryRegistry:
    """Every region registered with one server, and the leases in-flight requests hold on them.

    Owned by TrtServer (closed in stop()); used from the event loop, with a lock because backends'
    threads may release leases too.
    """

    def __init__(self, cuda: Optional[CudaApi] = None) -> None:
        self._regions: Dict[str, Region] = {}
        self._forgotten: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._cuda_api = cuda
        self._cuda_devices: Optional[int] = None  # probed once, on first need
        self._closed = False

    # -- capabilities --
    def cuda_device_count(self) -> int:
        """GPUs usable for CUDA regions: 0 without CuPy or without a GPU (probed once)."""
        if self._cuda_devices is None:
            api = self._cuda_api or CudaApi()
            try:
                self._cuda_devices = api.device_count()
            except Exception as e:  # ImportError without CuPy, CUDARuntimeError without a driver/GPU
                log.info("CUDA shared memory unavailable: %s: %s", type(e).__name__, e)
                self._cuda_devices = 0
            else:
                self._cuda_api = api
        return self._cuda_devices

    def cuda(self) -> CudaApi:
        """The CUDA calls, for copies that touch a GPU (callers checked that one exists)."""
        if self._cuda_api is None:
            self._cuda_api = CudaApi()
        return self._cuda_api

    def extensions(self) -> Tuple[str, ...]:
        """The ServerMetadata extension names that work in this process."""
        return ("system_shared_memory",) + (("cuda_shared_memory",) if self.cuda_device_count() > 0 else ())

    # -- registration --
    def _add(self, region: Region) -> None:
        with self._lock:
            if self._closed:
                region.close()
                raise Unavailable("the server is shutting down and accepts no new shared memory regions")
            if region.name in self._regions:
                region.close()
                raise AlreadyExists(f"shared memory region '{region.name}' already in manager")
            self._regions[region.name] = region
            self._forgotten.pop(region.name, None)

    def _check_new(self, name: str) -> None:
        if not name:
            raise InvalidArgument("a shared memory region needs a non-empty name")
        with self._lock:
            if name in self._regions:  # checked before opening anything, and again under the lock in _add
                raise AlreadyExists(f"shared memory region '{name}' already in manager")

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Maps ``byte_size`` bytes at ``offset`` of the POSIX shm object ``key`` under ``name``."""
        self._check_new(name)
        self._add(SystemRegion(name, key, int(offset), int(byte_size)))

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Opens a peer's cudaIpcMemHandle_t on ``device_id`` under ``name``."""
        self._check_new(name)
        devices = self.cuda_device_count()
        if devices == 0:
            raise InvalidArgument(f"failed to register CUDA shared memory region '{name}': this server has no "
                                  "usable GPU (needs CuPy and a CUDA device); use system shared memory")
        if not 0 <= device_id < devices:
            raise InvalidArgument(f"failed to register CUDA shared memory region '{name}': device {device_id} "
                                  f"does not exist (this server sees {devices} GPU(s))")
        if len(raw_handle) != CUDA_IPC_HANDLE_BYTES:
            raise InvalidArgument(f"failed to register CUDA shared memory region '{name}': raw_handle has "
                                  f"{len(raw_handle)} bytes, a cudaIpcMemHandle_t has {CUDA_IPC_HANDLE_BYTES}")
        if byte_size <= 0:
            raise InvalidArgument(f"failed to register CUDA shared memory region '{name}': byte size must be > 0")
        assert self._cuda_api is not None
        region = CudaRegion(name, raw_handle, int(device_id), int(byte_size), self._cuda_api)
        region.open()
        self._add(region)

    def status(self, kind: str, name: str = "") -> List[Region]:
        """Regions of ``kind`` ("system" or "CUDA"): all when ``name`` is empty, else that one."""
        with self._lock:
            if not name:
                return [r for r in self._regions.values() if r.kind == kind]
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find {kind.lower() if kind == 'system' else 'cuda'} shared memory region: "
                           f"'{name}'")
        if region.kind != kind:
            raise NotFound(f"The region named '{name}' is registered as {region.kind} shared memory, not {kind} "
                           "shared memory")
        return [region]

    def unregister(self, kind: str, name: str = "") -> None:
        """Forgets one region of ``kind`` (all of them when ``name`` is empty); unknown names are fine.

        A region still used by in-flight requests is closed when the last one finishes.
        """
        to_close = []
        with self._lock:
            names = [n for n, r in self._regions.items() if r.kind == kind and (not name or n == name)]
            for n in names:
                region = self._regions.pop(n)
                region.unregistered = True
                self._forgotten[n] = kind
                if region.leases == 0:
                    to_close.append(region)
            while len(self._forgotten) > _FORGOTTEN_NAMES:
                self._forgotten.popitem(last=False)
        for region in to_close:
            region.close()

    def close(self) -> None:
        """Unregisters everything (server shutdown); later registrations fail."""
        with self._lock:
            self._closed = True
        self.unregister("system")
        self.unregister("CUDA")

    # -- leases --
    def acquire(self, name: str, what: str) -> Region:
        """The region ``name`` for one request, kept open until ``release``."""
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                if name in self._forgotten:
                    raise NotFound(f"{what}: shared memory region '{name}' was unregistered; register it again "
                                   "before using it")
                raise NotFound(f"{what}: Unable to find shared memory region: '{name}'")
            region.leases += 1
            return region

    def release(self, regions: Iterable[Region]) -> None:
        to_close = []
        with self._lock:
            for region in regions:
                region.leases -= 1
                if region.leases == 0 and region.unregistered:
                    to_close.append(region)
        for region in to_close:
            region.close()

    def request(self) -> "RequestShm":
        """A per-request helper that reads inputs, checks and writes outputs, and releases its leases."""
        return RequestShm(self)


def _expected_bytes(dt: dtypes.DataType, shape: Sequence[int]) -> int:
    return (math.prod(shape) if shape else 1) * dt.itemsize


class RequestShm:
    """The shared-memory side of one ModelInfer: ``with registry.request() as shm: ...``."""

    def __init__(self, registry: SharedMemoryRegistry) -> None:
        self._registry = registry
        self._held: List[Region] = []
        self._device_regions: set = set()  # CUDA regions handed to the backend as DeviceTensor
        self.outputs: Dict[str, Tuple[Region, ShmRef]] = {}

    def __enter__(self) -> "RequestShm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self, finished: bool = True) -> None:
        """Gives back the request's leases.

        ``finished=False`` (the RPC was cancelled) with DeviceTensor inputs handed out: the backend
        may still be copying from the client's device memory, and nothing tells us when it stops,
        so those CUDA regions keep their lease and stay mapped until the process exits rather than
        risk an illegal-address fault that would poison the CUDA context.
        """
        held, self._held = self._held, []
        if not finished and self._device_regions:
            log.warning("cancelled request used CUDA regions %s directly; they stay mapped until exit",
                        sorted(self._device_regions))
            held = [r for r in held if r.name not in self._device_regions]
        self._registry.release(held)

    def _acquire(self, ref: ShmRef, what: str) -> Region:
        region = self._registry.acquire(ref.region, what)
        self._held.append(region)
        return region

    def read_input(self, name: str, dt: dtypes.DataType, shape: Tuple[int, ...], ref: ShmRef,
                   device_tensors: bool = False) -> Union[np.ndarray, DeviceTensor]:
        """The input's data from its region.

        System regions give a zero-copy, read-only view of the mapping, not a copy. That is safe:
        the lease keeps the mapping alive until the answer is sent, the view is read-only so the
        server never writes an input region, and the protocol's contract (Triton's too) is that a
        client leaves an input region unchanged until its request's response arrives, which is
        exactly how perf_analyzer and tritonclient use it. A batch of several requests is
        concatenated (copied) by the batcher anyway; a request alone in its batch is read by the
        backend straight from the client's pages, which is where the saving is. CUDA regions become
        a DeviceTensor when the backend takes them (``device_tensors``), otherwise one
        device-to-host copy (works with every backend, costs a PCIe transfer).
        """
        what = f"input '{name}'"
        region = self._acquire(ref, what)
        if dt.wire != "BYTES":
            expected = _expected_bytes(dt, shape)
            if ref.byte_size != expected:
                raise InvalidArgument(f"{what}: shared memory byte size {ref.byte_size} does not match shape "
                                      f"{list(shape)} of {dt.wire}, which needs {expected} bytes")
        if isinstance(region, CudaRegion):
            ptr = region.address(ref.offset, ref.byte_size, what)
            if dt.wire == "BYTES":
                raise InvalidArgument(f"{what}: BYTES inputs cannot come from CUDA shared memory; use system "
                                      "shared memory or raw_input_contents")
            if device_tensors:
                self._device_regions.add(region.name)
                return DeviceTensor(ptr, ref.byte_size, tuple(shape), dt.numpy.newbyteorder("<") if dt.itemsize > 1
                                    else dt.numpy, region.device_id, region.name)
            host = np.empty(shape, dtype=dt.numpy)
            if ref.byte_size:
                region._api.copy(host.ctypes.data, ptr, ref.byte_size, region.device_id)
            return host
        buf = region.buffer(ref.offset, ref.byte_size, what)
        if dt.wire == "BYTES":
            count = math.prod(shape) if shape else 1
            try:
                return dtypes.deserialize_bytes(buf.tobytes(), count).reshape(shape)
            except ValueError as e:
                raise InvalidArgument(f"{what}: malformed BYTES data in shared memory region '{ref.region}' for "
                                      f"shape {list(shape)}: {e}") from None
        arr = buf.view(dt.numpy.newbyteorder("<") if dt.itemsize > 1 else dt.numpy).reshape(shape)
        if not arr.flags.aligned:  # an odd offset: backends may not take unaligned memory
            arr = arr.copy()
        arr.flags.writeable = False
        return arr

    def add_output(self, name: str, ref: ShmRef) -> None:
        """Resolves an output's region before inference, so a bad one fails the request early."""
        what = f"output '{name}'"
        region = self._acquire(ref, what)
        region.check(ref.offset, ref.byte_size, what)
        obj, start = region.identity()
        lo = start + ref.offset
        for other, (oregion, oref) in self.outputs.items():
            oobj, ostart = oregion.identity()
            olo = ostart + oref.offset
            disjoint = lo + ref.byte_size <= olo or olo + oref.byte_size <= lo
            if obj == oobj and ref.byte_size and oref.byte_size and not disjoint:
                raise InvalidArgument(f"outputs '{other}' and '{name}' overlap in shared memory (region "
                                      f"'{oref.region}' bytes {oref.offset}..{oref.offset + oref.byte_size} and region "
                                      f"'{ref.region}' bytes {ref.offset}..{ref.offset + ref.byte_size}); give each "
                                      "output its own bytes")
        self.outputs[name] = (region, ref)

    def device_destination(self, name: str, device_id: int) -> Optional[Tuple[int, int]]:
        """(device pointer, byte size) of an output's CUDA region on ``device_id``, for a backend that writes
        results there itself (device to device); None for system regions or another device. The region
        then counts as handed to the backend (see ``release``)."""
        region, ref = self.outputs[name]
        if not isinstance(region, CudaRegion) or region.device_id != device_id:
            return None
        ptr = region.address(ref.offset, ref.byte_size, f"output '{name}'")
        self._device_regions.add(region.name)
        return ptr, ref.byte_size

    def check_output_size(self, name: str, dt: dtypes.DataType, shape: Sequence[int]) -> None:
        """Fails before inference when an output's full shape is known and will not fit its region."""
        if name not in self.outputs or dt.wire == "BYTES" or any(d < 0 for d in shape):
            return
        ref = self.outputs[name][1]
        need = _expected_bytes(dt, shape)
        if need > ref.byte_size:
            raise InvalidArgument(f"output '{name}': shared memory byte size {ref.byte_size} is too small for "
                                  f"shape {list(shape)} of {dt.wire}, which needs {need} bytes")

    def write_output(self, name: str, wire: str, array: Any) -> None:
        """Copies one result into its region: host arrays with memcpy (system) or host-to-device
        (CUDA); arrays already on a GPU (``__cuda_array_interface__``) device-to-device or to host."""
        region, ref = self.outputs[name]
        what = f"output '{name}'"
        dt = dtypes.BY_WIRE[wire]
        on_device = hasattr(array, "__cuda_array_interface__") and not isinstance(array, np.ndarray)
        if wire == "BYTES":
            data = np.frombuffer(dtypes.serialize_bytes(np.asarray(array)), dtype=np.uint8)
            src_ptr, nbytes = None, data.nbytes
        elif on_device:
            iface = array.__cuda_array_interface__
            if iface.get("strides") is not None:  # CuPy reports None for C-contiguous; compact anything else
                import cupy

                array = cupy.ascontiguousarray(cupy.asarray(array))
                iface = array.__cuda_array_interface__
            if np.dtype(iface["typestr"]) != dt.numpy:
                raise Internal(f"{what}: the backend returned {iface['typestr']} on the device, expected {wire}")
            nbytes = (math.prod(iface["shape"]) if iface["shape"] else 1) * dt.itemsize
            src_ptr, data = int(iface["data"][0]), None
        else:
            a = np.asarray(array)
            data = np.ascontiguousarray(a if a.dtype == dt.numpy else a.astype(dt.numpy))
            src_ptr, nbytes = None, data.nbytes
        if nbytes > ref.byte_size:
            raise InvalidArgument(f"{what}: the result has {nbytes} bytes but shared memory region '{ref.region}' "
                                  f"was given {ref.byte_size} bytes at offset {ref.offset}")
        if nbytes == 0:
            return
        if isinstance(region, CudaRegion):
            dst = region.address(ref.offset, nbytes, what)
            src = src_ptr if src_ptr is not None else data.ctypes.data
            region._api.copy(dst, src, nbytes, region.device_id)
            return
        out = region.buffer(ref.offset, nbytes, what)
        if src_ptr is not None:  # device result into a host region: one device-to-host copy
            device = int(getattr(getattr(array, "device", None), "id", 0))
            self._registry.cuda().copy(out.ctypes.data, src_ptr, nbytes, device)
        else:
            out[:] = data.reshape(-1).view(np.uint8)


__all__ = ["BYTE_SIZE", "CudaApi", "CudaRegion", "DeviceTensor", "OFFSET", "REGION", "RequestShm",
           "SharedMemoryRegistry", "ShmRef", "SystemRegion", "shm_ref"]
