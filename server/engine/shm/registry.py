"""The registry of Triton's shared-memory regions (system and CUDA), owned by the engine.

A client registers a region once (name -> POSIX key or CUDA IPC handle, with offset and size); then
inputs and outputs of any request name the region instead of carrying bytes. Region names share
one namespace across both kinds, as in Triton.

Status codes follow Triton's shared_memory_manager.cc: duplicate name ALREADY_EXISTS, a region
name no one registered NOT_FOUND, any bad use (offset, size, datatype, overlap, device)
INVALID_ARGUMENT; past ``max_regions`` RESOURCE_EXHAUSTED. Unregistering an unknown name succeeds
(perf_analyzer unregisters everything first). A region unregistered while requests use it stays
open until they finish (Triton's ``awaiting_unregister_``), but new requests cannot name it any more.

Layout of this package: cuda.py (the CUDA calls), regions.py (one region of each kind: how it is
opened, read and written), registry.py (this: names -> regions, leases, limits), request.py (what
one request does with them: ``RequestShm``), members.py (a group member's checks, remembered). CuPy
is imported only when a CUDA region is registered, so everything works on machines without CUDA.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from trtserve.server.engine.shm.cuda import CUDA_IPC_HANDLE_BYTES, CudaApi
from trtserve.server.engine.shm.regions import CudaRegion, Region, SystemRegion
from trtserve.server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from trtserve.server.engine.shm.request import RequestShm

log = logging.getLogger("trtserve.shm")

DEFAULT_MAX_REGIONS = 1024  # regions of both kinds per server; each system region holds one descriptor
_FORGOTTEN_NAMES = 1024  # unregistered names remembered, only to word "reuse after unregister" errors


class SharedMemoryRegistry:
    """Every region registered with one server, and the leases in-flight requests hold on them.

    Owned by TrtServer (closed in stop()); used from the event loop, with a lock because backends'
    threads may release leases too.

    ``max_regions`` caps the registered regions of both kinds together (each system region keeps
    one file descriptor open; a CUDA region one IPC mapping): registering one more answers
    RESOURCE_EXHAUSTED. The server's ``--max-shm-regions`` option sets it.
    """

    def __init__(self, cuda: Optional[CudaApi] = None, max_regions: int = DEFAULT_MAX_REGIONS) -> None:
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
            raise ValueError(f"max_regions must be a positive integer, got {max_regions!r}")
        self.max_regions = max_regions
        self._regions: Dict[str, Region] = {}
        self._forgotten: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._cuda_api = cuda
        self._cuda_devices: Optional[int] = None  # probed once, on first need
        self._closed = False
        self._generation = 0  # bumped by every registration and unregistration (members.py remembers by it)

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
            if len(self._regions) >= self.max_regions:
                region.close()
                raise self._exhausted(region.name)
            self._regions[region.name] = region
            self._forgotten.pop(region.name, None)
            self._generation += 1

    def _check_new(self, name: str) -> None:
        if not name:
            raise InvalidArgument("a shared memory region needs a non-empty name")
        with self._lock:
            if name in self._regions:  # checked before opening anything, and again under the lock in _add
                raise AlreadyExists(f"shared memory region '{name}' already in manager")
            if len(self._regions) >= self.max_regions:
                raise self._exhausted(name)

    def _exhausted(self, name: str) -> ResourceExhausted:
        return ResourceExhausted(f"failed to register shared memory region '{name}': the server already has "
                                 f"{len(self._regions)} shared memory regions (system and CUDA together), its limit; "
                                 "unregister regions no longer used, or start the server with a larger "
                                 f"--max-shm-regions (now {self.max_regions})")

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Registers ``byte_size`` bytes at ``offset`` of the POSIX shm object ``key`` under ``name``
        (one descriptor kept open; nothing mapped)."""
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
            if names:
                self._generation += 1
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

    @property
    def generation(self) -> int:
        """Changes whenever a region is registered or unregistered."""
        return self._generation

    def lease(self, regions: Iterable[Region], generation: int) -> bool:
        """Leases ``regions`` again (one lease per entry, as ``acquire`` gave them) if nothing was registered or
        unregistered since ``generation``, so every one of them is still registered under its name; else False,
        with nothing leased."""
        with self._lock:
            if generation != self._generation:
                return False
            for region in regions:
                region.leases += 1
        return True

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
        """A per-request helper that reads inputs, checks and writes outputs, and releases its leases
        (the same as ``request.RequestShm(registry)``)."""
        from trtserve.server.engine.shm.request import RequestShm  # request.py imports this module

        return RequestShm(self)

    def __len__(self) -> int:
        """Regions registered now (both kinds)."""
        with self._lock:
            return len(self._regions)


__all__ = ["CUDA_IPC_HANDLE_BYTES", "CudaApi", "CudaRegion", "DEFAULT_MAX_REGIONS", "Region", "SharedMemoryRegistry",
           "SystemRegion"]
