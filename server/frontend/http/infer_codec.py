"""Triton's HTTP/REST inference bodies <-> the gRPC messages that the inference path already checks and runs.

``parse_infer``: JSON (+ binary tensor data extension) -> ``pb.ModelInferRequest`` with one ``raw_input_contents``
entry per input not in shared memory, so ``validation.precheck`` and the service treat HTTP and gRPC alike (only
what the body itself must satisfy is checked here, not the model). ``encode_infer``: ``pb.ModelInferResponse`` ->
Triton's HTTP answer. Both are linear in the body and leave per-element work to NumPy where it can do it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from itertools import chain
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.errors import Internal, InvalidArgument
from trtserve.server.frontend.codec import MAX_ELEMENTS, parameter_value, shape_of
from trtserve.server.frontend.shm_params import BYTE_SIZE, OFFSET, REGION

_SHM_KEYS = (REGION, BYTE_SIZE, OFFSET)
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_JSON_KIND = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
              dict: "an object", type(None): "null"}
# JSON element types each datatype accepts (bool is not an int here: true is no INT32)
_BOOL, _STR, _INT, _NUMBER = frozenset((bool,)), frozenset((str,)), frozenset((int,)), frozenset((int, float))
_ALLOWED = {"BOOL": _BOOL, "BYTES": _STR, "FP16": _NUMBER, "FP32": _NUMBER, "FP64": _NUMBER, "BF16": _NUMBER}
_NEEDS = {_BOOL: "JSON booleans (true/false)", _STR: "JSON strings", _INT: "JSON integers", _NUMBER: "JSON numbers"}


@dataclasses.dataclass(frozen=True)
class OutputForm:
    """How the answer's outputs are written: which as binary (binary tensor data extension), and the
    shared-memory params to echo. Taken from the request by ``parse_infer``, used by ``encode_infer``."""

    binary_default: bool  # request parameter binary_data_output (default False)
    binary: Mapping[str, bool]  # per requested output: its binary_data parameter, when given
    shm: Mapping[str, Dict[str, object]]  # outputs written to shared memory (their shared_memory_* as given)

    def is_binary(self, name: str) -> bool:
        """The output's own binary_data parameter wins over the request's binary_data_output (as in Triton)."""
        return self.binary.get(name, self.binary_default)


def _kind(value: Any) -> str:
    return _JSON_KIND.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    """repr cut to ``limit`` characters, so a huge value cannot make a huge message."""
    text = repr(value)
    return text[:limit] + "..." if len(text) > limit else text


def _bad_json(message: str) -> InvalidArgument:
    return InvalidArgument(f"failed to parse the request JSON: {message}")


def json_field(obj: Mapping[str, Any], key: str, kind: type, what: str, required: bool = False) -> Any:
    """obj[key] when it has the JSON type ``kind`` (true/false are no integers); None when absent and not
    required. For every JSON body of the HTTP API, so all of them refuse a wrong field alike."""
    if key not in obj:
        if required:
            raise _bad_json(f"{what} has no '{key}'")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _bad_json(f"{what}: '{key}' must be {_JSON_KIND[kind]}, got {_kind(value)}")
    return value


def set_parameter(target: Any, key: str, value: Any, what: str) -> None:
    """One JSON parameter -> an InferParameter of ``target`` (a protobuf map); bool before int: bool is an int."""
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            target[key].int64_param = value
        elif 0 <= value <= _UINT64_MAX:
            target[key].uint64_param = value
        else:
            raise InvalidArgument(f"{what}: parameter '{key}' is {_short(value)}, outside the int64 and uint64 ranges")
    elif isinstance(value, float):
        target[key].double_param = value
    elif isinstance(value, str):
        target[key].string_param = value
    else:
        raise InvalidArgument(f"{what}: parameter '{key}' must be a boolean, integer, number or string, "
                              f"got {_kind(value)}")


def _flatten(name: str, data: Any) -> Tuple[list, set]:
    """Nested (row-major) or flat JSON array -> (flat list, set of its element types), one level at a time
    so the work stays in C; ragged arrays are InvalidArgument."""
    if not isinstance(data, list):
        raise InvalidArgument(f"input '{name}': 'data' must be a JSON array, got {_kind(data)}")
    level, depth = data, 0
    while True:
        types = set(map(type, level))
        if list not in types:
            return level, types
        depth += 1
        if len(types) > 1:
            raise InvalidArgument(f"input '{name}': ragged JSON data: arrays and values mixed at nesting depth {depth}")
        lengths = set(map(len, level))
        if len(lengths) > 1:
            raise InvalidArgument(f"input '{name}': ragged JSON data: arrays of lengths {sorted(lengths)[:2]} at "
                                  f"nesting depth {depth}; every array at one depth must have the same length")
        level = list(chain.from_iterable(level))


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), rounding to nearest even like ml_dtypes; NaN stays a (quiet) NaN."""
    bits = values.view(np.uint32)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # wraps only for NaNs, fixed below
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def _json_tensor(name: str, dt: dtypes.DataType, shape: Tuple[int, ...], data: Any) -> bytes:
    """One input's JSON ``data`` -> its raw little-endian bytes (BYTES: length-prefixed UTF-8 elements)."""
    flat, types = _flatten(name, data)
    count = math.prod(shape)
    if len(flat) != count:
        raise InvalidArgument(f"input '{name}': JSON data has {len(flat)} elements but shape {list(shape)} "
                              f"needs {count}")
    wire = dt.wire
    allowed = _ALLOWED.get(wire, _INT)
    if not types <= allowed:
        i = next(i for i, v in enumerate(flat) if type(v) not in allowed)
        raise InvalidArgument(f"input '{name}': datatype {wire} needs {_NEEDS[allowed]}, but element {i} is "
                              f"{_kind(flat[i])} ({_short(flat[i])})")
    if wire == "BYTES":
        items = np.empty(count, dtype=object)
        items[:] = flat
        try:
            return dtypes.serialize_bytes(items)
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"input '{name}': a string in JSON data cannot be encoded as UTF-8 ({e.reason}); "
                                  "send it as binary data") from None
    if allowed is _INT:
        info = np.iinfo(dt.numpy)
        if flat:
            low, high = min(flat), max(flat)
            if low < info.min or high > info.max:
                raise InvalidArgument(f"input '{name}': value {_short(low if low < info.min else high)} is outside "
                                      f"the {wire} range [{info.min}, {info.max}]")
        return np.array(flat, dtype=dt.numpy.newbyteorder("<")).tobytes()
    if wire == "BOOL":
        return np.array(flat, dtype=np.bool_).tobytes()
    try:
        with np.errstate(over="ignore"):  # a number beyond the type's range becomes inf, as a C cast makes it
            if wire == "BF16":
                return _bf16_bits(np.array(flat, dtype=np.float64).astype(np.float32)).astype("<u2").tobytes()
            return np.array(flat, dtype=dt.numpy.newbyteorder("<")).tobytes()
    except OverflowError:
        raise InvalidArgument(f"input '{name}': JSON data has an integer too large for {wire}") from None


def _input(request: pb.ModelInferRequest, i: int, t: Any) -> Optional[Union[bytes, int]]:
    """Adds inputs[i] to ``request``; returns its JSON data's bytes, its binary_data_size, or None (shared memory)."""
    if not isinstance(t, dict):
        raise _bad_json(f"inputs[{i}] must be an object, got {_kind(t)}")
    name = json_field(t, "name", str, f"inputs[{i}]", required=True)
    what = f"input '{name}'"
    datatype = json_field(t, "datatype", str, what, required=True)
    dims = json_field(t, "shape", list, what, required=True)
    if not all(type(d) is int for d in dims):
        raise _bad_json(f"{what}: 'shape' must be an array of integers, got {_short(dims, 200)}")
    dt = dtypes.BY_WIRE.get(datatype)
    if dt is None:
        raise InvalidArgument(f"{what}: unknown datatype {_short(datatype)}; known: {', '.join(dtypes.BY_WIRE)}")
    shape = tuple(dims)
    if (shape and min(shape) <= 0) or math.prod(shape) > MAX_ELEMENTS:
        shape = shape_of(name, shape)  # refuses negative or absurd dimensions, with the gRPC path's words
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    size: Optional[int] = None
    params = json_field(t, "parameters", dict, what) or {}
    for key, value in params.items():
        if key == "binary_data_size":
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"{what}: parameter 'binary_data_size' must be an integer >= 0, "
                                      f"got {_short(value)}")
            size = value
        else:  # shared_memory_* included: validation.parse_shm_ref checks them
            set_parameter(tensor.parameters, key, value, what)
    has_data = "data" in t
    if REGION in params:
        if has_data or size is not None:
            raise InvalidArgument(f"{what}: names a shared memory region and also carries "
                                  f"{'data' if has_data else 'binary data (binary_data_size)'}; use one")
        return None
    if size is not None:
        if has_data:
            raise InvalidArgument(f"{what}: has both 'data' and parameter 'binary_data_size' ({size}); "
                                  "send the tensor in one of them")
        return size
    if not has_data:
        raise InvalidArgument(f"{what}: no data; give 'data', parameter 'binary_data_size' (binary tensor data) "
                              "or a shared memory region")
    return _json_tensor(name, dt, shape, t["data"])


def _raws(request: pb.ModelInferRequest, entries: List[Union[bytes, int, None]], binary: memoryview,
          header_length: int) -> List[bytes]:
    """One raw entry per input not in shared memory, binary ones sliced off ``binary`` in turn; all of it used."""
    declared = sum(e for e in entries if isinstance(e, int))
    raws: List[bytes] = []
    pos, last = 0, None
    for t, entry in zip(request.inputs, entries):
        if isinstance(entry, int):
            if pos + entry > len(binary):
                raise InvalidArgument(f"input '{t.name}': binary_data_size {entry} runs past the end of the binary "
                                      f"data: the inputs declare {declared} bytes by binary_data_size but the body "
                                      f"has {len(binary)} bytes after the {header_length}-byte JSON header")
            raws.append(bytes(binary[pos:pos + entry]))
            pos += entry
            last = t.name
        elif entry is not None:
            raws.append(entry)
    if pos != len(binary):
        after = f" after input '{last}'" if last is not None else ""
        raise InvalidArgument(f"{len(binary) - pos} bytes of binary data are left over{after}: the inputs declare "
                              f"{declared} bytes by binary_data_size but the body has {len(binary)} bytes after the "
                              f"{header_length}-byte JSON header (Inference-Header-Content-Length)")
    return raws


def _outputs(request: pb.ModelInferRequest, outputs: List[Any]) -> Tuple[Dict[str, bool], Dict[str, Dict[str, object]]]:
    """Adds the requested outputs to ``request``; returns their binary_data and shared-memory parameters."""
    binary_of: Dict[str, bool] = {}
    shm_of: Dict[str, Dict[str, object]] = {}
    for i, o in enumerate(outputs):
        if not isinstance(o, dict):
            raise _bad_json(f"outputs[{i}] must be an object, got {_kind(o)}")
        name = json_field(o, "name", str, f"outputs[{i}]", required=True)
        what = f"output '{name}'"
        out = request.outputs.add(name=name)
        shm: Dict[str, object] = {}
        for key, value in (json_field(o, "parameters", dict, what) or {}).items():
            if key == "binary_data":
                if not isinstance(value, bool):
                    raise InvalidArgument(f"{what}: parameter 'binary_data' must be a boolean, got {_kind(value)}")
                binary_of[name] = value
                continue
            if key in _SHM_KEYS:
                shm[key] = value
            set_parameter(out.parameters, key, value, what)  # classification -> int64_param, checked by the service
        if REGION in shm:
            shm_of[name] = shm
    return binary_of, shm_of


def parse_infer(model: str, version: str, body: bytes, header_length: Optional[int],
                ) -> Tuple[pb.ModelInferRequest, OutputForm]:
    """An HTTP inference body -> (the gRPC request for the inference path, how to write the answer).

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None: the whole body is JSON);
    the bytes after the JSON are the inputs' binary data, in input order, ``binary_data_size`` each.
    """
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)
    elif not 0 <= header_length <= len(view):
        raise InvalidArgument(f"Inference-Header-Content-Length {header_length} is outside the body's "
                              f"0..{len(view)} bytes")
    try:
        whole = header_length == len(view) and isinstance(body, (bytes, bytearray))
        doc = json.loads(body if whole else view[:header_length].tobytes())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad_json(str(e) or type(e).__name__) from None
    if not isinstance(doc, dict):
        raise _bad_json(f"the request must be a JSON object, got {_kind(doc)}")
    request_id = json_field(doc, "id", str, "the request") or ""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    binary_default = False
    for key, value in (json_field(doc, "parameters", dict, "the request") or {}).items():
        if key == "binary_data_output":
            if not isinstance(value, bool):
                raise InvalidArgument(f"request parameter 'binary_data_output' must be a boolean, got {_kind(value)}")
            binary_default = value
        else:
            set_parameter(request.parameters, key, value, "request")
    inputs = json_field(doc, "inputs", list, "the request", required=True)
    entries = [_input(request, i, t) for i, t in enumerate(inputs)]
    request.raw_input_contents.extend(_raws(request, entries, view[header_length:], header_length))
    binary_of, shm_of = _outputs(request, json_field(doc, "outputs", list, "the request") or [])
    return request, OutputForm(binary_default, binary_of, shm_of)


def _json_data(name: str, wire: str, shape: List[int], raw: bytes) -> list:
    """One output's raw bytes -> a flat row-major JSON list (numbers via NumPy's tolist)."""
    dt = dtypes.BY_WIRE.get(wire)
    if dt is None:
        raise Internal(f"output '{name}': unknown datatype {wire!r}")
    if wire == "BYTES":
        try:
            items = dtypes.deserialize_bytes(raw, math.prod(shape)).tolist()
        except ValueError as e:
            raise Internal(f"output '{name}': malformed BYTES data: {e}") from None
        try:
            return [b.decode("utf-8") for b in items]
        except UnicodeDecodeError:  # find which: only valid UTF-8 survives a round trip with replacement
            i = next(i for i, b in enumerate(items) if b.decode("utf-8", "replace").encode("utf-8") != b)
            raise InvalidArgument(f"output '{name}': element {i} of the BYTES output is not valid UTF-8, which JSON "
                                  "cannot carry; request the output with parameter binary_data true") from None
    if len(raw) % dt.itemsize:
        raise Internal(f"output '{name}': {len(raw)} bytes are no whole number of {wire} elements")
    if wire == "BOOL":
        return (np.frombuffer(raw, dtype=np.uint8) != 0).tolist()
    if wire == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).tolist()
    return np.frombuffer(raw, dtype=dt.numpy.newbyteorder("<")).tolist()


def encode_infer(response: pb.ModelInferResponse, form: OutputForm) -> Tuple[bytes, Optional[int]]:
    """The answer as Triton's HTTP body: (body, JSON header length), the length None when no output is binary
    (the body is then pure JSON). Output i's data is ``response.raw_output_contents[i]``."""
    header: Dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = {k: parameter_value(p) for k, p in response.parameters.items()}
    raws = response.raw_output_contents
    outputs = []
    binary: List[bytes] = []
    for i, o in enumerate(response.outputs):
        name, shape = o.name, list(o.shape)
        entry: Dict[str, Any] = {"name": name, "datatype": o.datatype, "shape": shape}
        raw = raws[i] if i < len(raws) else b""
        if name in form.shm:
            # written to the client's region: name, datatype and shape only, as Triton answers; a "parameters"
            # object here would be read as binary data by Triton's C++ client (perf_analyzer)
            pass
        elif form.is_binary(name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = _json_data(name, o.datatype, shape, raw)
        outputs.append(entry)
    header["outputs"] = outputs
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if not binary:
        return text, None
    binary.insert(0, text)
    return b"".join(binary), len(text)


__all__ = ["OutputForm", "parse_infer", "encode_infer", "set_parameter", "json_field"]
