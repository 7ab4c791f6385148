"""NumPy <-> ModelInferRequest/ModelInferResponse, and the small request messages of the helpers.

I/O-free and shared by the sync and asyncio clients (the tritonclient ``_utils`` pattern), so both
send byte-identical requests and the round trips are unit-tested without a server. Tensors travel
in ``raw_input_contents`` / ``raw_output_contents``, little-endian, BYTES as 4-byte length-prefixed
elements and BF16 as its raw 16-bit patterns (``np.uint16``); the datatype table is trtserve.dtypes.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from trtserve import dtypes
from trtserve.client._errors import InferenceServerError
from trtserve.protos import grpc_service_pb2 as pb

__all__ = [
    "bf16_to_float32",
    "build_infer_request",
    "decode_infer_response",
    "decode_tensor",
    "encode_tensor",
    "float32_to_bf16",
    "load_request",
    "version_str",
]

ParamValue = Union[bool, int, float, str]
Version = Optional[Union[str, int]]  # a model version as the clients take it: None (the server's choice), 3 or "3"


def version_str(version: Version) -> str:
    """The protocol's ``model_version`` field: empty for the server's choice."""
    return "" if version is None else str(version)


# names with a meaning fixed by the protocol; set through infer()'s own arguments
_RESERVED_PARAMS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")


def float32_to_bf16(array: np.ndarray) -> np.ndarray:
    """Rounds float32 values to bfloat16 (nearest, ties to even) and returns their bit patterns as uint16."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    nan = np.isnan(array)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(nan, np.uint16(0x7FC0), rounded)


def bf16_to_float32(array: np.ndarray) -> np.ndarray:
    """Widens bfloat16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(array, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _as_wire_array(name: str, array: np.ndarray, wire: str) -> np.ndarray:
    """The array in the storage dtype of ``wire``: BF16 from float32 is rounded, other casts must be exact."""
    dt = dtypes.BY_WIRE[wire]
    if wire == "BYTES":
        if array.dtype.kind not in ("S", "U", "O"):
            raise InferenceServerError("INVALID_ARGUMENT", f"input '{name}': BYTES needs a bytes, str or object "
                                       f"array, got dtype {array.dtype}")
        return array
    if wire == "BF16" and array.dtype.kind == "f":
        return float32_to_bf16(array)
    if array.dtype == dt.numpy:
        return array
    if array.dtype.kind in ("S", "U", "O"):
        raise InferenceServerError("INVALID_ARGUMENT", f"input '{name}': cannot send a {array.dtype} array as {wire}")
    cast = array.astype(dt.numpy)
    if not np.array_equal(cast.astype(array.dtype), array, equal_nan=array.dtype.kind == "f"):
        raise InferenceServerError("INVALID_ARGUMENT", f"input '{name}': values of the {array.dtype} array do not "
                                   f"fit {wire}; cast it yourself if losing them is intended")
    return cast


def encode_tensor(name: str, array: np.ndarray, datatype: Optional[str] = None) -> Tuple[
        pb.ModelInferRequest.InferInputTensor, bytes]:
    """One input tensor's metadata and its raw bytes; ``datatype`` overrides the one inferred from the dtype."""
    array = np.asarray(array)
    if not array.dtype.isnative:  # the table knows native dtypes; the raw bytes are written little-endian below
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        wire = datatype.upper() if datatype else dtypes.wire_of(array)
        dtypes.from_wire(wire)
    except KeyError as e:
        raise InferenceServerError("INVALID_ARGUMENT", f"input '{name}': {e.args[0]}") from None
    array = _as_wire_array(name, array, wire)
    if wire == "BYTES":
        raw = dtypes.serialize_bytes(array)
    else:
        dt = dtypes.BY_WIRE[wire].numpy
        raw = np.ascontiguousarray(array, dtype=dt.newbyteorder("<") if dt.itemsize > 1 else dt).tobytes()
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=wire, shape=list(array.shape))
    return tensor, raw


def _set_param(param: pb.InferParameter, value: ParamValue) -> None:
    if isinstance(value, bool):  # before int: bool is an int
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InferenceServerError("INVALID_ARGUMENT", f"parameter value {value!r}: expected bool, int, float or str, "
                                   f"got {type(value).__name__}")


def build_infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Optional[Sequence[str]] = None,
    version: Optional[Union[str, int]] = None,
    priority: Optional[int] = None,
    timeout: Optional[float] = None,
    request_id: Optional[str] = None,
    datatypes: Optional[Mapping[str, str]] = None,
    parameters: Optional[Mapping[str, ParamValue]] = None,
) -> pb.ModelInferRequest:
    """The ModelInferRequest for ``inputs`` ({name: array}); ``timeout`` (s) also goes to the server, in us.

    ``outputs`` limits the response to those names (None: all); ``datatypes`` names wire types NumPy
    cannot express, e.g. ``{"x": "BF16"}`` (float32 arrays are rounded, uint16 ones sent as is).
    """
    if not model:
        raise InferenceServerError("INVALID_ARGUMENT", "model name is empty")
    request = pb.ModelInferRequest(model_name=model, model_version="" if version is None else str(version))
    if request_id:
        request.id = request_id
    types = dict(datatypes or {})
    unknown = sorted(set(types) - set(inputs))
    if unknown:
        raise InferenceServerError("INVALID_ARGUMENT", f"datatypes name {unknown}, which are not among the inputs "
                                   f"{sorted(inputs)}")
    for name, array in inputs.items():
        tensor, raw = encode_tensor(name, array, types.get(name))
        request.inputs.append(tensor)
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=name)
    if priority:
        request.parameters["priority"].uint64_param = int(priority)
    if timeout is not None:
        request.parameters["timeout"].int64_param = max(1, int(timeout * 1e6))
    for key, value in (parameters or {}).items():
        if key in _RESERVED_PARAMS:
            raise InferenceServerError("INVALID_ARGUMENT", f"parameter '{key}' is reserved; use infer()'s own argument")
        _set_param(request.parameters[key], value)
    return request


def decode_tensor(name: str, datatype: str, shape: Sequence[int], raw: Optional[bytes],
                  contents: Optional[pb.InferTensorContents] = None) -> np.ndarray:
    """One tensor from its raw bytes (or typed contents). Raw numeric arrays are read-only views of the buffer."""
    try:
        dt = dtypes.from_wire(datatype)
    except KeyError as e:
        raise InferenceServerError("INTERNAL", f"output '{name}': {e.args[0]}") from None
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InferenceServerError("INTERNAL", f"output '{name}': shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if raw is None:
        if dt.contents_field is None or contents is None:
            if count == 0:
                return np.empty(shape, dtype=dt.numpy)
            raise InferenceServerError("INTERNAL", f"output '{name}': the response carries no data for it")
        values = getattr(contents, dt.contents_field)
        if len(values) != count:
            raise InferenceServerError("INTERNAL", f"output '{name}': contents.{dt.contents_field} has {len(values)} "
                                       f"elements, shape {list(shape)} needs {count}")
        if dt.wire == "BYTES":
            out = np.empty(count, dtype=object)
            out[:] = list(values)
            return out.reshape(shape)
        return np.asarray(values).astype(dt.numpy).reshape(shape)
    if dt.wire == "BYTES":
        try:
            return dtypes.deserialize_bytes(raw, count).reshape(shape)
        except ValueError as e:
            raise InferenceServerError("INTERNAL", f"output '{name}': {e}") from None
    if len(raw) != count * dt.itemsize:
        raise InferenceServerError("INTERNAL", f"output '{name}': {len(raw)} raw bytes, shape {list(shape)} of "
                                   f"{dt.wire} needs {count * dt.itemsize}")
    wire_dtype = dt.numpy.newbyteorder("<") if dt.itemsize > 1 else dt.numpy
    return np.frombuffer(raw, dtype=wire_dtype).reshape(shape)


def decode_infer_response(response: pb.ModelInferResponse) -> Dict[str, np.ndarray]:
    """{output name: array} in response order; BF16 outputs come back as uint16 (see bf16_to_float32)."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InferenceServerError("INTERNAL", f"response has {len(response.outputs)} outputs but "
                                   f"{len(raw)} raw_output_contents entries")
    result: Dict[str, np.ndarray] = {}
    for i, t in enumerate(response.outputs):
        contents = t.contents if t.HasField("contents") else None
        result[t.name] = decode_tensor(t.name, t.datatype, t.shape, raw[i] if raw else None, contents)
    return result


def load_request(model: str, config: Optional[str] = None,
                 files: Optional[Mapping[str, bytes]] = None) -> pb.RepositoryModelLoadRequest:
    """RepositoryModelLoad with Triton's optional overrides: ``config`` JSON and ``file:<path>`` contents."""
    request = pb.RepositoryModelLoadRequest(model_name=model)
    if config is not None:
        request.parameters["config"].string_param = config
    for path, data in (files or {}).items():
        request.parameters[f"file:{path}"].bytes_param = data
    return request
