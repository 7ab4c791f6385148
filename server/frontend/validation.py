"""Checks one request against its model, once, where it enters, before anything is decoded.

``precheck(spec, request, max_input_bytes)`` works on the undecoded ModelInferRequest in time bounded by the
model's inputs and outputs (plus, for typed 8/16-bit integer contents only, one scan of values the message
already carries): names, datatypes, shapes, raw byte counts, typed-contents fields and counts, shared-memory
parameters and sizes, requested outputs. Only a request that passes is staged (service.py decodes typed
contents and checks BYTES framing as it copies), so a client cannot make the server decode megabytes of
BYTES, or read a large shared-memory region, for a request that is refused anyway.

A request that fails here is answered INVALID_ARGUMENT on its own and never reaches a batch, so its bad data
cannot fail the requests it would have been batched with. Every message names the tensor, what was expected
and what arrived, with the words of the decode-then-check path it replaced (tests/reference_codec.py, which
the tests compare it with).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.errors import InvalidArgument
from trtserve.server.engine.repository.model_config import ModelSpec
from trtserve.server.frontend.codec import _CONTENT_FIELDS, shape_of
from trtserve.server.frontend.shm_params import ShmRef, parse_shm_ref


@dataclasses.dataclass(frozen=True)
class Prechecked:
    """What ``precheck`` found: everything the decoder and the batcher need to know up front."""

    rows: int  # batch size (1 for a model that does not batch)
    outputs: Tuple[str, ...]  # outputs to compute: the requested ones in request order, or all of the model's
    shapes: Mapping[str, Tuple[int, ...]]  # input name -> its shape as sent, in request order
    datatypes: Mapping[str, str]  # input name -> wire datatype (equal to the model's)
    input_shm: Mapping[str, ShmRef]  # inputs that name a shared-memory region
    output_shm: Mapping[str, ShmRef]  # requested outputs to be written into a shared-memory region
    shm_bytes: int  # bytes the inputs take from shared memory, all together (<= max_input_bytes)


def _where(spec: ModelSpec) -> str:
    return f"model '{spec.name}' version {spec.version}"


def _check_outputs(spec: ModelSpec, request: pb.ModelInferRequest, allow_shm: bool,
                   ) -> Tuple[Tuple[str, ...], Dict[str, ShmRef]]:
    known = {t.name for t in spec.outputs}
    names: List[str] = []
    seen = set()
    refs: Dict[str, ShmRef] = {}
    # Bounded: every iteration either fails or adds a new name of the model's, so the loop stops after
    # at most len(spec.outputs) + 1 entries however many the request lists (60,000 cost what 2 do).
    for o in request.outputs:
        name = o.name
        if name not in known:
            raise InvalidArgument(f"{_where(spec)}: unknown requested output {_quote(name)}; the model's outputs are "
                                  f"{sorted(known)}")
        if name in seen:
            raise InvalidArgument(f"output '{name}' is requested more than once")
        seen.add(name)
        names.append(name)
        what = f"output '{name}'"
        ref = parse_shm_ref(o.parameters, what)
        if ref is not None:
            if not allow_shm:
                raise InvalidArgument(f"{what}: shared memory outputs are not supported by this server")
            refs[name] = ref
    if len(names) > len(spec.outputs):  # cannot happen after the checks above; kept as the stated bound
        raise InvalidArgument(f"{_where(spec)}: {len(request.outputs)} outputs requested but the model has "
                              f"{len(spec.outputs)}")
    return tuple(names) or tuple(t.name for t in spec.outputs), refs


def _quote(name: str, limit: int = 200) -> str:
    """'name', cut to ``limit`` characters so a huge name cannot make a huge message."""
    if len(name) <= limit:
        return f"'{name}'"
    return f"'{name[:limit]}...' ({len(name)} characters cut to {limit})"


def check_request_outputs(spec: ModelSpec, request: pb.ModelInferRequest, allow_shm: bool = True) -> Tuple[str, ...]:
    """The outputs to compute: the requested names in request order, or all of the model's when none
    are requested. Unknown names are rejected first, then duplicates (a set), so the work is bounded
    by the model's outputs, not by the request. Also parses each output's shared-memory parameters
    (an offset or byte size without a region, a non-string region, ... are InvalidArgument; with
    ``allow_shm`` False any region is). Touches no input data."""
    return _check_outputs(spec, request, allow_shm)[0]


def _narrow_int_range_error(dt: dtypes.DataType, values: Any) -> bool:
    """True when typed integer contents hold a value the datatype cannot (only 8/16-bit types can:
    the contents fields are 32 or 64 bits wide, matching the wider types)."""
    if dt.numpy.kind not in "iu" or dt.itemsize > 2 or not len(values):
        return False
    info = np.iinfo(dt.numpy)
    return min(values) < info.min or max(values) > info.max


def precheck(spec: ModelSpec, request: pb.ModelInferRequest, max_input_bytes: Optional[int],
             allow_shm: bool = True) -> Prechecked:
    """Checks ``request`` against ``spec`` without decoding any tensor data; InvalidArgument on the first fault.

    In order (the order in which the decoder and validate_request used to find them):

    1. input names: known to the model, none twice (stops at the first bad one, so the work is bounded
       by the model's inputs however many the request lists);
    2. raw_input_contents: one entry per input that does not name a shared-memory region;
    3. each input's own data: known datatype; shape without negative or absurd dimensions; shared-memory
       parameters well formed (offset/byte size need a region; the region is a string) and not combined
       with typed contents; the byte size equal to shape x itemsize (fixed-size types) or at least 4 bytes
       per element (BYTES); raw bytes equal to shape x itemsize (fixed-size types) or at least 4 per
       element (BYTES: the length prefixes; the rest is checked when decoding); typed contents in the
       datatype's field, with one value per element and, for 8/16-bit integers, in range;
    4. the bytes taken from shared memory, all inputs together, at most ``max_input_bytes`` (None: no
       limit), so a small request cannot make the server read more than a message could carry;
    5. against the model: required inputs present, datatype, rank, fixed dimensions, variable dimensions
       not 0, batch size 1..max_batch_size and the same for every input;
    6. requested outputs (``check_request_outputs``).

    With ``allow_shm`` False any shared-memory region is refused ("not supported by this server").
    """
    where = _where(spec)
    expected = {t.name: t for t in spec.inputs}
    inputs = request.inputs
    # 1. names (bounded: each iteration fails or consumes one of the model's inputs)
    seen = set()
    for t in inputs:
        name = t.name
        if name not in expected:
            raise InvalidArgument(f"{where}: unexpected input {_quote(name)}; the model's inputs are "
                                  f"{sorted(expected)}")
        if name in seen:
            raise InvalidArgument(f"input '{name}' appears more than once in the request")
        seen.add(name)
    # 2. raw entries vs inputs that carry their data in the message
    refs: Dict[str, ShmRef] = {}
    for t in inputs:
        ref = parse_shm_ref(t.parameters, f"input '{t.name}'")
        if ref is not None:
            if not allow_shm:
                raise InvalidArgument(f"input '{t.name}': shared memory inputs are not supported by this server")
            refs[t.name] = ref
    raw = request.raw_input_contents
    n_data = len(inputs) - len(refs)
    if raw and len(raw) != n_data:
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries but the request has "
                              f"{n_data} inputs{' not in shared memory' if n_data != len(inputs) else ''}; "
                              "send one entry per input, in order")
    # 3. each input's own data, still undecoded
    shapes: Dict[str, Tuple[int, ...]] = {}
    types: Dict[str, str] = {}
    shm_bytes = 0
    raw_index = 0
    for t in inputs:
        name = t.name
        if t.datatype not in dtypes.BY_WIRE:
            raise InvalidArgument(f"input '{name}': unknown datatype '{t.datatype}'; "
                                  f"known: {', '.join(dtypes.BY_WIRE)}")
        dt = dtypes.BY_WIRE[t.datatype]
        shape = shape_of(name, t.shape)
        count = math.prod(shape) if shape else 1
        used = [f for f in _CONTENT_FIELDS if len(getattr(t.contents, f))] if t.HasField("contents") else []
        ref = refs.get(name)
        if ref is not None:
            if used:
                raise InvalidArgument(f"input '{name}': sets typed contents and a shared memory region; use one")
            if dt.wire == "BYTES":
                if ref.byte_size < 4 * count:
                    raise InvalidArgument(f"input '{name}': shared memory byte size {ref.byte_size} is too small for "
                                          f"shape {list(shape)} of BYTES, which needs at least {4 * count} bytes "
                                          "(a 4-byte length prefix per element)")
            else:
                need = count * dt.itemsize
                if ref.byte_size != need:
                    raise InvalidArgument(f"input '{name}': shared memory byte size {ref.byte_size} does not match "
                                          f"shape {list(shape)} of {dt.wire}, which needs {need} bytes")
            if max_input_bytes is not None and shm_bytes + ref.byte_size > max_input_bytes:
                raise InvalidArgument(
                    f"input '{name}': shared memory byte size {ref.byte_size}"
                    + (f" (with the request's other shared memory inputs, {shm_bytes + ref.byte_size})"
                       if shm_bytes else "")
                    + f" is more than the {max_input_bytes} bytes a request may take from shared memory "
                      "(max_input_bytes); send smaller requests")
            shm_bytes += ref.byte_size
        elif raw:
            if used:
                raise InvalidArgument(f"input '{name}': sets typed contents while the request uses "
                                      "raw_input_contents; use one or the other for all inputs")
            got = len(raw[raw_index])
            raw_index += 1
            if dt.wire == "BYTES":
                if 4 * count > got:  # the decoder's own first check, with its words
                    raise InvalidArgument(f"input '{name}': malformed BYTES data for shape {list(shape)}: BYTES data "
                                          f"runs past the end: {count} elements need at least {count * 4} bytes "
                                          f"of length prefixes, got {got} bytes")
            elif got != count * dt.itemsize:
                raise InvalidArgument(f"input '{name}': raw_input_contents holds {got} bytes but shape {list(shape)} "
                                      f"of {dt.wire} needs {count * dt.itemsize} bytes")
        elif used:
            if dt.contents_field is None:
                raise InvalidArgument(f"input '{name}': {dt.wire} has no typed contents field; send it in "
                                      "raw_input_contents")
            wrong = [f for f in used if f != dt.contents_field]
            if wrong:
                raise InvalidArgument(f"input '{name}': datatype {dt.wire} must use contents.{dt.contents_field}, "
                                      f"but the request sets contents.{', contents.'.join(wrong)}")
            values = getattr(t.contents, dt.contents_field)
            if len(values) != count:
                raise InvalidArgument(f"input '{name}': contents.{dt.contents_field} has {len(values)} elements but "
                                      f"shape {list(shape)} needs {count}")
            if _narrow_int_range_error(dt, values):
                raise InvalidArgument(f"input '{name}': contents.{dt.contents_field} has values outside the "
                                      f"{dt.wire} range")
        elif count != 0:
            raise InvalidArgument(f"input '{name}': no data; set raw_input_contents or contents")
        shapes[name] = shape
        types[name] = dt.wire
    # 5. against the model
    missing = [t.name for t in spec.inputs if t.name not in shapes and not t.optional]
    if missing:
        raise InvalidArgument(f"{where}: missing input(s) {missing}; the model's inputs are {sorted(expected)}")
    rows = _check_shapes(spec, shapes, types)
    # 6. outputs
    names, out_refs = _check_outputs(spec, request, allow_shm)
    return Prechecked(rows=rows, outputs=names, shapes=shapes, datatypes=types, input_shm=refs,
                      output_shm=out_refs, shm_bytes=shm_bytes)


def _check_shapes(spec: ModelSpec, shapes: Mapping[str, Tuple[int, ...]], types: Mapping[str, str]) -> int:
    """Datatype, rank, dims and batch size of each input against the model; returns the batch size."""
    where = _where(spec)
    expected = {t.name: t for t in spec.inputs}
    rows = None
    for name, shape in shapes.items():
        t = expected[name]
        if types[name] != t.datatype:
            raise InvalidArgument(f"{where}: input '{name}' has datatype {types[name]}, expected {t.datatype}")
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
    return rows or 1


__all__ = ["Prechecked", "precheck", "check_request_outputs"]
