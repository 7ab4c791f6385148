"""What one request does with shared memory, once the front end parsed a tensor's three parameters (a
``ShmRef``): through ``RequestShm``, read its inputs, check and resolve its outputs, write results, and give the
regions back when the answer is sent.

Everything a request touches is checked against the registered region first, so a request can never
read or write outside it. System-region inputs are copied out with ``preadv`` (into a fresh array or
a buffer the caller provides), never viewed in place: see regions.py for why.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from trtserve import dtypes
from trtserve.server.engine.backends.base import DeviceTensor
from trtserve.server.engine.shm.regions import CudaRegion, Region, writable_bytes
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.errors import Internal, InvalidArgument

log = logging.getLogger("trtserve.shm")

@dataclasses.dataclass(frozen=True)
class ShmRef:
    """The three parameters of one input or output: which region, where in it, how many bytes."""

    region: str
    offset: int
    byte_size: int


def _expected_bytes(dt: dtypes.DataType, shape: Sequence[int]) -> int:
    return (math.prod(shape) if shape else 1) * dt.itemsize


def _little_endian(dt: dtypes.DataType) -> np.dtype:
    return dt.numpy.newbyteorder("<") if dt.itemsize > 1 else dt.numpy


class RequestShm:
    """The shared-memory side of one ModelInfer: ``with RequestShm(registry) as shm: ...`` (or
    ``registry.request()``, the same thing)."""

    def __init__(self, registry: SharedMemoryRegistry) -> None:
        self._registry = registry
        self._held: List[Region] = []
        self._device_regions: set = set()  # CUDA regions handed to the backend as DeviceTensor
        self.outputs: Dict[str, Tuple[Region, Any]] = {}  # name -> (region, its ShmRef)

    @classmethod
    def leased(cls, registry: SharedMemoryRegistry, regions: Sequence[Region], device_regions: frozenset,
               outputs: Dict[str, Tuple[Region, Any]]) -> "RequestShm":
        """One whose checks passed for another request naming the same windows (members.py): ``regions`` already
        leased again for it (``registry.lease``), with the outputs and device regions that request resolved."""
        shm = cls(registry)
        shm._held = list(regions)
        shm._device_regions = set(device_regions)
        shm.outputs = dict(outputs)
        return shm

    def held(self) -> Tuple[Region, ...]:
        """The regions leased so far, one entry per lease."""
        return tuple(self._held)

    def device_regions(self) -> frozenset:
        """Names of the CUDA regions handed to the backend as device tensors or destinations."""
        return frozenset(self._device_regions)

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

    @staticmethod
    def release_all(shms: Sequence["RequestShm"]) -> None:
        """``release(finished=True)`` of each, in one step of the registry (a group's members share it)."""
        held: List[Region] = []
        for shm in shms:
            held += shm._held
            shm._held = []
        if held:
            shms[0]._registry.release(held)

    def _acquire(self, ref: Any, what: str) -> Region:
        region = self._registry.acquire(ref.region, what)
        self._held.append(region)
        return region

    def read_input(self, name: str, dt: dtypes.DataType, shape: Tuple[int, ...], ref: Any,
                   device_tensors: bool = False, out: Any = None) -> Union[np.ndarray, DeviceTensor]:
        """The input's data from its region, as an array of ``shape`` (``ref`` is a ShmRef or anything
        with ``region``, ``offset`` and ``byte_size``).

        System regions: a copy (``preadv``), in memory the client cannot truncate; an object shrunk
        since registration is an InvalidArgument naming the input and the region. CUDA regions become
        a DeviceTensor when the backend takes them (``device_tensors``), otherwise one device-to-host
        copy (works with every backend, costs a PCIe transfer).

        ``out``: a writable, C-contiguous buffer of exactly ``ref.byte_size`` bytes (a slice of a
        batch or of an IPC arena) to copy into instead of a fresh array; the returned array views it
        (for BYTES, the raw bytes land in ``out`` and the returned object array is decoded from them).
        Not used when a DeviceTensor is returned. A caller's buffer that is not aligned for the
        datatype gives an aligned copy instead of a view. A fresh array is always aligned.
        """
        what = f"input '{name}'"
        return self._read(self._acquire(ref, what), what, dt, shape, ref, device_tensors, out)

    def device_input(self, name: str, dt: dtypes.DataType, shape: Tuple[int, ...], ref: Any,
                     device_id: int) -> Optional[DeviceTensor]:
        """The input as a DeviceTensor, checked as ``read_input`` checks it, when it lies in a CUDA region on
        ``device_id``; None, without reading anything, when it lies elsewhere (the region stays held until
        ``release`` all the same)."""
        what = f"input '{name}'"
        region = self._acquire(ref, what)
        if not isinstance(region, CudaRegion) or region.device_id != device_id or dt.wire == "BYTES":
            return None
        return self._read(region, what, dt, shape, ref, True, None)  # type: ignore[return-value]

    def _read(self, region: Region, what: str, dt: dtypes.DataType, shape: Tuple[int, ...], ref: Any,
              device_tensors: bool, out: Any) -> Union[np.ndarray, DeviceTensor]:
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
                return DeviceTensor(ptr, ref.byte_size, tuple(shape), _little_endian(dt), region.device_id,
                                    region.name)
            flat = (np.empty(ref.byte_size, dtype=np.uint8) if out is None
                    else writable_bytes(out, ref.byte_size, what))
            if ref.byte_size:
                region.api.copy(flat.ctypes.data, ptr, ref.byte_size, region.device_id)
        else:
            flat = region.read(ref.offset, ref.byte_size, what, out)
        if dt.wire == "BYTES":
            count = math.prod(shape) if shape else 1
            try:
                return dtypes.deserialize_bytes(flat.tobytes(), count).reshape(shape)
            except ValueError as e:
                raise InvalidArgument(f"{what}: malformed BYTES data in shared memory region '{ref.region}' for "
                                      f"shape {list(shape)}: {e}") from None
        arr = flat.view(_little_endian(dt)).reshape(shape)
        if not arr.flags.aligned:  # only a caller's ``out`` can be unaligned: backends may not take that
            arr = arr.copy()
        return arr

    def add_output(self, name: str, ref: Any) -> None:
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
        """Copies one result into its region: host arrays with ``pwritev`` (system) or host-to-device
        (CUDA); arrays already on a GPU (``__cuda_array_interface__``) device-to-device, or to a host
        buffer and then written. A system object shrunk below the window is refused (InvalidArgument
        naming the output), and so is a write that fails or stops short."""
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
            region.api.copy(dst, src, nbytes, region.device_id)
            return
        if src_ptr is not None:  # device result into a host region: device to host, then written
            device = int(getattr(getattr(array, "device", None), "id", 0))
            data = np.empty(nbytes, dtype=np.uint8)
            self._registry.cuda().copy(data.ctypes.data, src_ptr, nbytes, device)
        region.write(ref.offset, data, what)


__all__ = ["RequestShm", "ShmRef"]
