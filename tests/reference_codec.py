"""The request path before checks moved ahead of decoding: decode every tensor, then check the arrays against the
model. The server no longer uses it; tests keep it as the reference that ``validation.precheck`` (and the fuzz
properties) are compared with, so a request is refused by the same rule with the same words on either path."""
from __future__ import annotations

import math
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.engine.repository.model_config import ModelSpec
from trtserve.server.errors import InvalidArgument
from trtserve.server.frontend.codec import _CONTENT_FIELDS, decode_contents as _from_contents
from trtserve.server.frontend.codec import decode_raw as _from_raw
from trtserve.server.frontend.codec import shape_of as _shape
from trtserve.server.frontend.shm_params import check_no_orphans

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



def validate_request(
    spec: ModelSpec, arrays: Mapping[str, np.ndarray], datatypes: Mapping[str, str], outputs: Sequence[str]
) -> Tuple[int, Tuple[str, ...]]:
    """Returns (rows, output names to compute); rows is the batch dim (1 for non-batching models)."""
    where = f"model '{spec.name}' version {spec.version}"
    expected = {t.name: t for t in spec.inputs}
    for name in arrays:
        if name not in expected:
            raise InvalidArgument(f"{where}: unexpected input '{name}'; the model's inputs are {sorted(expected)}")
    missing = [t.name for t in spec.inputs if t.name not in arrays and not t.optional]
    if missing:
        raise InvalidArgument(f"{where}: missing input(s) {missing}; the model's inputs are {sorted(expected)}")
    rows = None
    for name, arr in arrays.items():
        t = expected[name]
        if datatypes[name] != t.datatype:
            raise InvalidArgument(f"{where}: input '{name}' has datatype {datatypes[name]}, expected {t.datatype}")
        shape = arr.shape
        full = ((-1,) if spec.batches else ()) + tuple(t.dims)
        if len(shape) != len(full):
            raise InvalidArgument(f"{where}: input '{name}' has shape {list(shape)} (rank {len(shape)}), expected "
                                  f"rank {len(full)} shape {list(full)}")
        if spec.batches:
            n = shape[0]
            if n < 1:
                raise InvalidArgument(f"{where}: input '{name}' has batch size 0; send at least one row")
            if n > spec.max_batch_size:
                raise InvalidArgument(f"{where}: input '{name}' has batch size {n}, more than max_batch_size "
                                      f"{spec.max_batch_size}")
            if rows is not None and n != rows:
                raise InvalidArgument(f"{where}: input '{name}' has batch size {n} but other inputs have {rows}; "
                                      "every input must have the same batch size")
            rows = n
        for i, (got, want) in enumerate(zip(shape, full)):
            if want != -1 and got != want:
                raise InvalidArgument(f"{where}: input '{name}' has shape {list(shape)}, expected {list(full)} "
                                      f"(dim {i} must be {want})")
            if want == -1 and got == 0 and not (spec.batches and i == 0):
                raise InvalidArgument(f"{where}: input '{name}' has shape {list(shape)}; variable dim {i} is 0")
    names = tuple(outputs) or tuple(t.name for t in spec.outputs)
    known = {t.name for t in spec.outputs}
    for name in names:
        if name not in known:
            raise InvalidArgument(f"{where}: unknown requested output '{name}'; the model's outputs are "
                                  f"{sorted(known)}")
    return (rows or 1), names


def output_datatypes(spec: ModelSpec) -> Dict[str, str]:
    return {t.name: t.datatype for t in spec.outputs}
