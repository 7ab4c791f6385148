"""ModelInferRequest -> NumPy arrays, NumPy arrays -> ModelInferResponse.

Decoding checks only what the message itself must satisfy (known datatype, sane shape, raw byte
count == shape x datatype, typed ``contents`` in the right field with the right count); checks
against the model live in frontend/validation.py, whose ``precheck`` runs before any decoding.
Every failure names the tensor, what was expected and what arrived.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.errors import InvalidArgument
from trtserve.server.frontend.shm_params import check_no_orphans

MAX_ELEMENTS = 1 << 40  # far above any real tensor; guards the shape product before allocating
_CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                   "fp32_contents", "fp64_contents", "bytes_contents")


def _shape(name: str, shape: Sequence[int]) -> Tuple[int, ...]:
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"input '{name}': shape {list(shape)} has a negative dimension")
    count = math.prod(shape) if shape else 1
    if count > MAX_ELEMENTS:
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has {count} elements, more than the "
                              f"{MAX_ELEMENTS} any request may carry")
    span = math.prod(d for d in shape if d)  # NumPy rejects huge dims even next to a 0 ("array is too big")
    if span > MAX_ELEMENTS:
        raise InvalidArgument(f"input '{name}': shape {list(shape)} has dimensions whose product ({span}) is more "
                              f"than the {MAX_ELEMENTS} elements any request may carry")
    return tuple(int(d) for d in shape)


def _from_raw(name: str, dt: dtypes.DataType, shape: Tuple[int, ...], raw: bytes) -> np.ndarray:
    count = math.prod(shape) if shape else 1
    if dt.wire == "BYTES":
        try:
            return dtypes.deserialize_bytes(raw, count).reshape(shape)
        except ValueError as e:
            raise InvalidArgument(f"input '{name}': malformed BYTES data for shape {list(shape)}: {e}") from None
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise InvalidArgument(f"input '{name}': raw_input_contents holds {len(raw)} bytes but shape {list(shape)} "
                              f"of {dt.wire} needs {expected} bytes")
    return np.frombuffer(raw, dtype=dt.numpy.newbyteorder("<") if dt.itemsize > 1 else dt.numpy).reshape(shape)


def _from_contents(name: str, dt: dtypes.DataType, shape: Tuple[int, ...], contents: pb.InferTensorContents):
    count = math.prod(shape) if shape else 1
    used = [f for f in _CONTENT_FIELDS if len(getattr(contents, f))]
    if dt.contents_field is None:
        raise InvalidArgument(f"input '{name}': {dt.wire} has no typed contents field; send it in raw_input_contents")
    wrong = [f for f in used if f != dt.contents_field]
    if wrong:
        raise InvalidArgument(f"input '{name}': datatype {dt.wire} must use contents.{dt.contents_field}, "
                              f"but the request sets contents.{', contents.'.join(wrong)}")
    values = getattr(contents, dt.contents_field)
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': contents.{dt.contents_field} has {len(values)} elements but shape "
                              f"{list(shape)} needs {count}")
    if dt.wire == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    # uint64_contents may exceed int64: read unsigned fields as uint64 so no value overflows here
    arr = np.asarray(values, dtype={"i": np.int64, "u": np.uint64}.get(dt.numpy.kind))
    if dt.numpy.kind in "iu":
        info = np.iinfo(dt.numpy)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InvalidArgument(f"input '{name}': contents.{dt.contents_field} has values outside the {dt.wire} range")
    return arr.astype(dt.numpy).reshape(shape)


# (input tensor, datatype, shape) -> its data from shared memory; see engine/shm/registry.py
ShmReader = Callable[[Any, dtypes.DataType, Tuple[int, ...]], Any]


def decode_inputs(request: pb.ModelInferRequest, shm_reader: Optional[ShmReader] = None,
                  ) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Returns ({name: array}, {name: wire datatype}); InvalidArgument on any malformed tensor.

    With ``shm_reader``, inputs that name a shared-memory region are read through it and have no
    raw_input_contents entry: as in Triton and its clients, the raw entries belong, in order, to
    the inputs that do not use shared memory.
    """
    raw = request.raw_input_contents
    in_shm = [shm_reader is not None and "shared_memory_region" in t.parameters for t in request.inputs]
    n_data = len(request.inputs) - sum(in_shm)
    if raw and len(raw) != n_data:
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries but the request has "
                              f"{n_data} inputs{' not in shared memory' if n_data != len(request.inputs) else ''}; "
                              "send one entry per input, in order")
    arrays: Dict[str, np.ndarray] = {}
    types: Dict[str, str] = {}
    raw_index = 0
    for i, t in enumerate(request.inputs):
        if t.name in arrays:
            raise InvalidArgument(f"input '{t.name}' appears more than once in the request")
        check_no_orphans(t.parameters, f"input '{t.name}'")
        if t.datatype not in dtypes.BY_WIRE:
            raise InvalidArgument(f"input '{t.name}': unknown datatype '{t.datatype}'; "
                                  f"known: {', '.join(dtypes.BY_WIRE)}")
        dt = dtypes.BY_WIRE[t.datatype]
        shape = _shape(t.name, t.shape)
        if in_shm[i]:
            assert shm_reader is not None
            if t.HasField("contents") and any(len(getattr(t.contents, f)) for f in _CONTENT_FIELDS):
                raise InvalidArgument(f"input '{t.name}': sets typed contents and a shared memory region; use one")
            arrays[t.name] = shm_reader(t, dt, shape)
            types[t.name] = t.datatype
            continue
        has_contents = t.HasField("contents") and any(len(getattr(t.contents, f)) for f in _CONTENT_FIELDS)
        if raw:
            if has_contents:
                raise InvalidArgument(f"input '{t.name}': sets typed contents while the request uses "
                                      "raw_input_contents; use one or the other for all inputs")
            arrays[t.name] = _from_raw(t.name, dt, shape, raw[raw_index])
            raw_index += 1
        elif has_contents or (math.prod(shape) if shape else 1) == 0:
            arrays[t.name] = _from_contents(t.name, dt, shape, t.contents) if has_contents else np.empty(
                shape, dtype=dt.numpy)
        else:
            if "shared_memory_region" in t.parameters:
                raise InvalidArgument(f"input '{t.name}': shared memory inputs are not supported by this server")
            raise InvalidArgument(f"input '{t.name}': no data; set raw_input_contents or contents")
        types[t.name] = t.datatype
    return arrays, types


def requested_outputs(request: pb.ModelInferRequest, allow_shm: bool = False) -> Tuple[str, ...]:
    """Names of the requested outputs in request order (empty = all); duplicates rejected.

    Linear in the number of requested outputs (a set, not a list scan); for a check bounded by the
    model's outputs, before any decoding, use validation.check_request_outputs / precheck.
    """
    names = []
    seen = set()
    for o in request.outputs:
        if o.name in seen:
            raise InvalidArgument(f"output '{o.name}' is requested more than once")
        check_no_orphans(o.parameters, f"output '{o.name}'")
        if "shared_memory_region" in o.parameters and not allow_shm:
            raise InvalidArgument(f"output '{o.name}': shared memory outputs are not supported by this server")
        seen.add(o.name)
        names.append(o.name)
    return tuple(names)


def encode_response(
    request: pb.ModelInferRequest, model_name: str, version: str, outputs: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str], in_shm: Collection[str] = (),
) -> pb.ModelInferResponse:
    """One ``raw_output_contents`` entry per output, in ``outputs`` order (tritonclient/perf_analyzer need it).

    Outputs in ``in_shm`` were written to shared memory: they keep their name, datatype and shape
    and get an empty entry, as Triton does.
    """
    response = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request.id)
    for name, arr in outputs.items():
        wire = datatypes[name]
        response.outputs.add(name=name, datatype=wire, shape=list(arr.shape))
        if name in in_shm:
            response.raw_output_contents.append(b"")
        elif wire == "BYTES":
            response.raw_output_contents.append(dtypes.serialize_bytes(arr))
        else:
            want = dtypes.BY_WIRE[wire].numpy
            a = arr if arr.dtype == want else arr.astype(want)
            response.raw_output_contents.append(np.ascontiguousarray(a).tobytes())
    return response


def parameter_value(p: pb.InferParameter):
    """The Python value of an InferParameter oneof (None if unset)."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None
