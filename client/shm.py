"""Shared-memory helpers for trtserve's client: create regions, fill and read them, register them with
a server, and build requests whose tensors live in them (Triton's system and CUDA shared memory).

Mirrors ``tritonclient.utils.shared_memory`` and ``tritonclient.utils.cuda_shared_memory`` (same
verbs, one module: the functions take either kind of region), so code moves between the two
clients easily, and regions made here work with tritonclient and Triton too::

    from trtserve.client import InferenceClient, shm
    with InferenceClient("127.0.0.1:8001") as client, \\
            shm.create_shared_memory_region("in", "/my_in", x.nbytes) as r_in, \\
            shm.create_shared_memory_region("out", "/my_out", 4096) as r_out:
        shm.set_shared_memory_region(r_in, [x])
        shm.register(client, r_in)
        shm.register(client, r_out)
        response = client.model_infer(shm.build_request(
            "mlp", [shm.shm_input("INPUT0", "FP32", x.shape, r_in)], [shm.shm_output("OUTPUT0", r_out)]))
        y = shm.outputs(response, {"OUTPUT0": r_out})["OUTPUT0"]
        shm.unregister(client, r_in)

Unlike tritonclient there is no process-wide table of regions: each handle owns its mapping and is
a context manager. POSIX objects are opened with shm_open directly rather than through
multiprocessing.shared_memory, whose resource tracker unlinks objects a process merely attached to
when it exits (Python < 3.13). CuPy is imported only by the CUDA functions.
"""
from __future__ import annotations

import base64
import contextlib
import mmap
import os
import uuid
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from trtserve import dtypes
from trtserve.client import _codec
from trtserve.client._errors import InferenceServerError
from trtserve.protos import grpc_service_pb2 as pb

__all__ = [
    "CudaRegion",
    "SystemRegion",
    "as_cupy",
    "build_request",
    "registered_request",
    "create_cuda_shared_memory_region",
    "create_shared_memory_region",
    "destroy_shared_memory_region",
    "get_contents_as_numpy",
    "get_raw_handle",
    "outputs",
    "register",
    "set_shared_memory_region",
    "shm_input",
    "shm_output",
    "status",
    "unregister",
]

Client = Any  # InferenceClient or AsyncInferenceClient: both have the private _call(rpc, request)


def _shm_name(key: str) -> str:
    name = key.lstrip("/")
    if not name or "/" in name or "\0" in name:
        raise ValueError(f"shared memory key {key!r}: expected one name, optionally with a leading '/'")
    return "/" + name


def _shm_open(key: str, flags: int) -> int:
    try:
        import _posixshmem

        return _posixshmem.shm_open(_shm_name(key), flags, mode=0o600)
    except ImportError:  # Linux keeps POSIX shared memory in /dev/shm
        return os.open(os.path.join("/dev/shm", _shm_name(key)[1:]), flags, 0o600)


def _shm_unlink(key: str) -> None:
    try:
        import _posixshmem

        _posixshmem.shm_unlink(_shm_name(key))
    except ImportError:
        os.unlink(os.path.join("/dev/shm", _shm_name(key)[1:]))


class SystemRegion:
    """A mapped POSIX shared-memory object; ``name`` is what the server knows it by."""

    kind = "system"

    def __init__(self, name: str, key: str, byte_size: int, created: bool, mapping: mmap.mmap) -> None:
        self.name = name
        self.key = key
        self.byte_size = byte_size
        self.created = created  # only the creator unlinks the object
        self._mmap: Optional[mmap.mmap] = mapping

    def buffer(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"shared memory region '{self.name}' was destroyed")
        return self._mmap

    def __enter__(self) -> "SystemRegion":
        return self

    def __exit__(self, *exc: object) -> None:
        destroy_shared_memory_region(self)


class CudaRegion:
    """A CUDA allocation of its own (cudaMalloc, never a memory-pool slice, so its IPC handle
    names exactly these bytes) that the server opens through the handle."""

    kind = "cuda"

    def __init__(self, name: str, byte_size: int, device_id: int, memory: Any) -> None:
        self.name = name
        self.byte_size = byte_size
        self.device_id = device_id
        self._memory = memory  # cupy.cuda.Memory; freed when dropped

    @property
    def ptr(self) -> int:
        if self._memory is None:
            raise ValueError(f"CUDA shared memory region '{self.name}' was destroyed")
        return int(self._memory.ptr)

    @property
    def raw_handle(self) -> bytes:
        """The 64 bytes of the cudaIpcMemHandle_t, as CudaSharedMemoryRegister carries them."""
        cp = _cupy()
        with cp.cuda.Device(self.device_id):
            return bytes(cp.cuda.runtime.ipcGetMemHandle(self.ptr))

    def __enter__(self) -> "CudaRegion":
        return self

    def __exit__(self, *exc: object) -> None:
        destroy_shared_memory_region(self)


Region = Union[SystemRegion, CudaRegion]


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise RuntimeError("CUDA shared memory needs CuPy (pip install cupy-cuda12x)") from None
    return cupy


# ---- create / fill / read / destroy --------------------------------------------------------------------------------

def create_shared_memory_region(name: str, key: str, byte_size: int, create_only: bool = False) -> SystemRegion:
    """Creates (or, unless ``create_only``, opens an existing) POSIX object ``key`` and maps it."""
    if byte_size <= 0:
        raise ValueError(f"byte_size must be > 0, got {byte_size}")
    created = True
    try:
        fd = _shm_open(key, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    except FileExistsError:
        if create_only:
            raise
        fd, created = _shm_open(key, os.O_RDWR), False
    try:
        if created:
            os.ftruncate(fd, byte_size)
        size = os.fstat(fd).st_size
        if size < byte_size:
            raise ValueError(f"shared memory object {key!r} exists with {size} bytes, fewer than {byte_size}")
        mapping = mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        if created:
            _shm_unlink(key)
        raise
    os.close(fd)  # the mapping keeps the object alive
    return SystemRegion(name, key, byte_size, created, mapping)


def create_cuda_shared_memory_region(name: str, byte_size: int, device_id: int = 0) -> CudaRegion:
    """Allocates ``byte_size`` bytes on ``device_id`` for sharing with the server."""
    if byte_size <= 0:
        raise ValueError(f"byte_size must be > 0, got {byte_size}")
    cp = _cupy()
    with cp.cuda.Device(device_id):
        memory = cp.cuda.Memory(byte_size)  # a cudaMalloc of its own: its IPC handle covers exactly this
    return CudaRegion(name, byte_size, device_id, memory)


def get_raw_handle(region: CudaRegion) -> bytes:
    """The handle base64-encoded, as tritonclient's register_cuda_shared_memory expects it."""
    return base64.b64encode(region.raw_handle)


def _as_bytes(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        return np.frombuffer(dtypes.serialize_bytes(array), dtype=np.uint8)
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _check_fits(region: Region, offset: int, nbytes: int) -> None:
    if offset < 0 or offset + nbytes > region.byte_size:
        raise ValueError(f"{nbytes} bytes at offset {offset} do not fit region '{region.name}' "
                         f"({region.byte_size} bytes)")


def set_shared_memory_region(region: Region, values: Sequence[Any], offset: int = 0) -> None:
    """Writes the arrays one after the other from ``offset`` (BYTES arrays in their wire form).

    CUDA regions also take CuPy arrays (device-to-device copies).
    """
    if not isinstance(values, (list, tuple)):
        raise TypeError("values must be a list or tuple of arrays")
    for value in values:
        if isinstance(region, CudaRegion) and not isinstance(value, np.ndarray):
            cp = _cupy()
            src = cp.ascontiguousarray(value)
            _check_fits(region, offset, src.nbytes)
            with cp.cuda.Device(region.device_id):
                cp.cuda.runtime.memcpy(region.ptr + offset, src.data.ptr, src.nbytes, cp.cuda.runtime.memcpyDefault)
            offset += src.nbytes
            continue
        data = _as_bytes(np.asarray(value))
        _check_fits(region, offset, data.nbytes)
        if isinstance(region, CudaRegion):
            cp = _cupy()
            with cp.cuda.Device(region.device_id):
                cp.cuda.runtime.memcpy(region.ptr + offset, data.ctypes.data, data.nbytes,
                                       cp.cuda.runtime.memcpyHostToDevice)
        else:
            np.frombuffer(region.buffer(), dtype=np.uint8, count=data.nbytes, offset=offset)[:] = data
        offset += data.nbytes


def _np_dtype(datatype: Union[str, np.dtype, type]) -> Tuple[np.dtype, str]:
    if isinstance(datatype, str):
        dt = dtypes.from_wire(datatype)
        return dt.numpy, dt.wire
    npd = np.dtype(datatype)
    return npd, ("BYTES" if npd.kind in "OSU" else dtypes.wire_of(np.empty(0, npd)))


def get_contents_as_numpy(region: Region, datatype: Union[str, np.dtype, type], shape: Sequence[int],
                          offset: int = 0) -> np.ndarray:
    """A copy of a tensor in the region; ``datatype`` is a wire name ("FP32") or a NumPy dtype."""
    npd, wire = _np_dtype(datatype)
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape)) if shape else 1
    if isinstance(region, CudaRegion):
        if wire == "BYTES":
            raise ValueError("BYTES tensors cannot be read from CUDA regions")
        out = np.empty(shape, dtype=npd)
        _check_fits(region, offset, out.nbytes)
        cp = _cupy()
        with cp.cuda.Device(region.device_id):
            cp.cuda.runtime.memcpy(out.ctypes.data, region.ptr + offset, out.nbytes, cp.cuda.runtime.memcpyDeviceToHost)
        return out
    buf = region.buffer()
    if wire == "BYTES":  # the region is longer than the tensor: find its end element by element
        end = offset
        for _ in range(count):
            _check_fits(region, end, 4)
            end += 4 + int.from_bytes(buf[end:end + 4], "little")
        _check_fits(region, offset, end - offset)
        return dtypes.deserialize_bytes(buf[offset:end], count).reshape(shape)
    _check_fits(region, offset, count * npd.itemsize)
    return np.frombuffer(buf, dtype=npd, count=count, offset=offset).reshape(shape).copy()


def as_cupy(region: CudaRegion, datatype: Union[str, np.dtype, type], shape: Sequence[int], offset: int = 0) -> Any:
    """A zero-copy CuPy view of a tensor in a CUDA region (valid while the region lives)."""
    cp = _cupy()
    npd, _ = _np_dtype(datatype)
    shape = tuple(int(d) for d in shape)
    nbytes = (int(np.prod(shape)) if shape else 1) * npd.itemsize
    _check_fits(region, offset, nbytes)
    mem = cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(region.ptr, region.byte_size, region, region.device_id),
                                offset)
    return cp.ndarray(shape, dtype=npd, memptr=mem)


def destroy_shared_memory_region(region: Region) -> None:
    """Unmaps (system; unlinks the object if this handle created it) or frees (CUDA) the region."""
    if isinstance(region, CudaRegion):
        region._memory = None
        return
    mapping, region._mmap = region._mmap, None
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:  # a NumPy view of it is still alive: it unmaps when that view goes
        pass
    if region.created:
        try:
            _shm_unlink(region.key)
        except FileNotFoundError:
            pass


# ---- the RPCs ------------------------------------------------------------------------------------------------------

def register(client: Client, region: Region, offset: int = 0, byte_size: Optional[int] = None) -> Any:
    """Registers the region (``offset``/``byte_size``: a window of a system object) under its name.

    Works with both clients: returns the response, or an awaitable for AsyncInferenceClient.
    """
    if isinstance(region, CudaRegion):
        request = pb.CudaSharedMemoryRegisterRequest(name=region.name, raw_handle=region.raw_handle,
                                                     device_id=region.device_id,
                                                     byte_size=region.byte_size if byte_size is None else byte_size)
        return client._call("CudaSharedMemoryRegister", request)
    size = region.byte_size - offset if byte_size is None else byte_size
    request = pb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key, offset=offset, byte_size=size)
    return client._call("SystemSharedMemoryRegister", request)


def unregister(client: Client, region: Union[Region, str] = "", kind: str = "system") -> Any:
    """Unregisters one region (a handle, or a name of ``kind`` "system"/"cuda"); "" = every one of ``kind``."""
    if not isinstance(region, str):
        kind, region = region.kind, region.name
    if kind == "cuda":
        return client._call("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest(name=region))
    if kind != "system":
        raise ValueError(f"kind must be 'system' or 'cuda', got {kind!r}")
    return client._call("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name=region))


def status(client: Client, kind: str = "system", name: str = "") -> Any:
    """The server's Status response for ``kind`` (regions by name); all regions when ``name`` is ""."""
    if kind == "cuda":
        return client._call("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest(name=name))
    return client._call("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=name))


# ---- requests and responses ----------------------------------------------------------------------------------------

def _set_shm_params(params: Any, region: Region, byte_size: int, offset: int) -> None:
    params["shared_memory_region"].string_param = region.name
    params["shared_memory_byte_size"].int64_param = byte_size
    if offset:
        params["shared_memory_offset"].int64_param = offset


def shm_input(name: str, datatype: str, shape: Sequence[int], region: Region, byte_size: Optional[int] = None,
              offset: int = 0) -> pb.ModelInferRequest.InferInputTensor:
    """An input whose data is already in ``region`` at ``offset`` (byte_size: shape x datatype by default)."""
    dt = dtypes.from_wire(datatype)
    if byte_size is None:
        if dt.wire == "BYTES":
            raise ValueError(f"input '{name}': give byte_size for BYTES (its serialized length)")
        byte_size = (int(np.prod(shape)) if len(shape) else 1) * dt.itemsize
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=dt.wire, shape=[int(d) for d in shape])
    _set_shm_params(tensor.parameters, region, byte_size, offset)
    return tensor


def shm_output(name: str, region: Region, byte_size: Optional[int] = None,
               offset: int = 0) -> pb.ModelInferRequest.InferRequestedOutputTensor:
    """An output the server writes into ``region`` at ``offset`` (byte_size: the rest of the region)."""
    tensor = pb.ModelInferRequest.InferRequestedOutputTensor(name=name)
    _set_shm_params(tensor.parameters, region, region.byte_size - offset if byte_size is None else byte_size, offset)
    return tensor


def build_request(model: str, inputs: Sequence[pb.ModelInferRequest.InferInputTensor] = (),
                  outputs: Sequence[Union[str, pb.ModelInferRequest.InferRequestedOutputTensor]] = (),
                  arrays: Optional[Mapping[str, np.ndarray]] = None, version: Optional[Union[str, int]] = None,
                  request_id: Optional[str] = None) -> pb.ModelInferRequest:
    """A ModelInferRequest mixing shared-memory inputs and ordinary ``arrays`` (sent raw).

    Only the ordinary inputs get raw_input_contents entries, as the protocol wants; ``outputs`` may
    name plain outputs (str) or shared-memory ones (shm_output).
    """
    request = _codec.build_infer_request(model, dict(arrays or {}), None, version, request_id=request_id)
    request.inputs.extend(inputs)
    for o in outputs:
        if isinstance(o, str):
            request.outputs.add(name=o)
        else:
            request.outputs.append(o)
    return request


def outputs(response: pb.ModelInferResponse, regions: Mapping[str, Union[Region, Tuple[Region, int]]],
            ) -> Dict[str, np.ndarray]:
    """Every output of ``response``: those named in ``regions`` ({name: region or (region, offset)})
    read back from there with the datatype and shape the response gives, the others decoded."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InferenceServerError("INTERNAL", f"response has {len(response.outputs)} outputs but {len(raw)} "
                                   "raw_output_contents entries")
    result: Dict[str, np.ndarray] = {}
    for i, t in enumerate(response.outputs):
        where = regions.get(t.name)
        if where is None:
            contents = t.contents if t.HasField("contents") else None
            result[t.name] = _codec.decode_tensor(t.name, t.datatype, t.shape, raw[i] if raw else None, contents)
            continue
        region, offset = where if isinstance(where, tuple) else (where, 0)
        result[t.name] = get_contents_as_numpy(region, t.datatype, list(t.shape), offset)
    return result


@contextlib.asynccontextmanager
async def registered_request(client: Any, model: str, data: Mapping[str, np.ndarray],
                             output_sizes: Mapping[str, int], kind: str = "system",
                             datatypes: Optional[Mapping[str, str]] = None, version: Optional[Union[str, int]] = None,
                             device_id: int = 0) -> AsyncIterator[pb.ModelInferRequest]:
    """A reusable request whose inputs and outputs all live in freshly registered regions.

    For load generators (``trtserve bench --shared-memory``, perf_analyzer's pattern): one region
    per input, filled once, and one per output ({name: byte size}), shared by every request sent
    while the context is open; ``client`` is an AsyncInferenceClient. On exit the regions are
    unregistered and destroyed.
    """
    if kind not in ("system", "cuda"):
        raise ValueError(f"shared memory kind must be system or cuda, got {kind!r}")
    tag = uuid.uuid4().hex[:12]
    types = dict(datatypes or {})
    made: List[Region] = []

    def region(name: str, size: int) -> Region:
        r = (create_cuda_shared_memory_region(f"trtserve_{tag}_{name}", size, device_id) if kind == "cuda"
             else create_shared_memory_region(f"trtserve_{tag}_{name}", f"/trtserve_{tag}_{len(made)}", size))
        made.append(r)
        return r

    registered: List[Region] = []
    try:
        inputs = []
        for name, array in data.items():
            tensor, raw = _codec.encode_tensor(name, array, types.get(name))
            r = region(f"in_{name}", max(1, len(raw)))
            set_shared_memory_region(r, [np.frombuffer(raw, dtype=np.uint8)])
            inputs.append(shm_input(name, tensor.datatype, list(tensor.shape), r, byte_size=len(raw)))
        outs = [shm_output(name, region(f"out_{name}", size)) for name, size in output_sizes.items()]
        for r in made:
            await register(client, r)
            registered.append(r)
        yield build_request(model, inputs, outs, version=version)
    finally:
        for r in registered:
            try:
                await unregister(client, r)
            except InferenceServerError:
                pass
        for r in made:
            destroy_shared_memory_region(r)
