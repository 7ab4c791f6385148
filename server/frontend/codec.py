"""One tensor of a ModelInferRequest -> a NumPy array (raw bytes or typed contents), and shape sanity.

Decoding checks only what the message itself must satisfy (known datatype, sane shape, raw byte
count == shape x datatype, typed ``contents`` in the right field with the right count); checks
against the model live in frontend/validation.py, whose ``precheck`` runs before any decoding.
Every failure names the tensor, what was expected and what arrived.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.errors import InvalidArgument

MAX_ELEMENTS = 1 << 40  # far above any real tensor; guards the shape product before allocating
_CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                   "fp32_contents", "fp64_contents", "bytes_contents")


def shape_of(name: str, shape: Sequence[int]) -> Tuple[int, ...]:
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


def decode_raw(name: str, dt: dtypes.DataType, shape: Tuple[int, ...], raw: bytes) -> np.ndarray:
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


def decode_contents(name: str, dt: dtypes.DataType, shape: Tuple[int, ...],
                    contents: pb.InferTensorContents) -> np.ndarray:
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
            raise InvalidArgument(f"input '{name}': contents.{dt.contents_field} has values outside the "
                                  f"{dt.wire} range")
    return arr.astype(dt.numpy).reshape(shape)


def parameter_value(p: pb.InferParameter) -> Any:
    """The Python value of an InferParameter oneof (None if unset)."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None
