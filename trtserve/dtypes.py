"""The one table of tensor datatypes: KServe v2 wire names <-> NumPy <-> Triton config enum names.

Shared by the server and the client (a leaf module: imports only NumPy). BF16 has no NumPy type,
so BF16 tensors travel and sit in memory as their raw 16-bit patterns (``np.uint16``); BYTES
tensors are NumPy object arrays of ``bytes`` on our side and 4-byte little-endian length-prefixed
elements on the wire.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass(frozen=True)
class DataType:
    """One row of the table."""

    wire: str  # "FP32"
    config: str  # "TYPE_FP32" (model_config.proto DataType enum name)
    numpy: np.dtype  # storage dtype (uint16 for BF16, object for BYTES)
    itemsize: int  # bytes per element on the wire; 0 for BYTES (variable)
    contents_field: Optional[str]  # InferTensorContents field carrying it, None if raw only


_ROWS = (
    DataType("BOOL", "TYPE_BOOL", np.dtype(np.bool_), 1, "bool_contents"),
    DataType("UINT8", "TYPE_UINT8", np.dtype(np.uint8), 1, "uint_contents"),
    DataType("UINT16", "TYPE_UINT16", np.dtype(np.uint16), 2, "uint_contents"),
    DataType("UINT32", "TYPE_UINT32", np.dtype(np.uint32), 4, "uint_contents"),
    DataType("UINT64", "TYPE_UINT64", np.dtype(np.uint64), 8, "uint64_contents"),
    DataType("INT8", "TYPE_INT8", np.dtype(np.int8), 1, "int_contents"),
    DataType("INT16", "TYPE_INT16", np.dtype(np.int16), 2, "int_contents"),
    DataType("INT32", "TYPE_INT32", np.dtype(np.int32), 4, "int_contents"),
    DataType("INT64", "TYPE_INT64", np.dtype(np.int64), 8, "int64_contents"),
    DataType("FP16", "TYPE_FP16", np.dtype(np.float16), 2, None),
    DataType("FP32", "TYPE_FP32", np.dtype(np.float32), 4, "fp32_contents"),
    DataType("FP64", "TYPE_FP64", np.dtype(np.float64), 8, "fp64_contents"),
    DataType("BF16", "TYPE_BF16", np.dtype(np.uint16), 2, None),
    DataType("BYTES", "TYPE_STRING", np.dtype(object), 0, "bytes_contents"),
)

BY_WIRE: Dict[str, DataType] = {r.wire: r for r in _ROWS}
BY_CONFIG: Dict[str, DataType] = {r.config: r for r in _ROWS}
# NumPy -> wire, for callers that hand us arrays (BF16 cannot be inferred from NumPy: pass it explicitly)
_BY_NUMPY: Dict[np.dtype, str] = {r.numpy: r.wire for r in _ROWS if r.wire != "BF16"}


def from_wire(name: str) -> DataType:
    """Looks up a wire datatype name; raises KeyError with the known names."""
    try:
        return BY_WIRE[name]
    except KeyError:
        raise KeyError(f"unknown datatype {name!r}; known: {', '.join(BY_WIRE)}") from None


def wire_of(array: np.ndarray) -> str:
    """The wire datatype for a NumPy array (str/bytes/object arrays -> BYTES)."""
    dt = array.dtype
    if dt.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return _BY_NUMPY[dt]
    except KeyError:
        raise KeyError(f"NumPy dtype {dt} has no KServe v2 datatype") from None


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> wire form: per element (C order) a uint32 LE length, then the bytes."""
    parts = []
    for item in array.reshape(-1):
        b = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buf: bytes, count: int) -> np.ndarray:
    """Wire BYTES -> flat object array of ``count`` elements; ValueError if the prefixes are corrupt."""
    if count * 4 > len(buf):  # checked before allocating: a tiny message must not claim a huge tensor
        raise ValueError(f"BYTES data runs past the end: {count} elements need at least {count * 4} bytes "
                         f"of length prefixes, got {len(buf)} bytes")
    out = np.empty(count, dtype=object)
    view = memoryview(buf)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise ValueError(f"BYTES element {i}: length prefix runs past the end ({len(view)} bytes)")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise ValueError(f"BYTES element {i}: length {n} runs past the end ({len(view)} bytes)")
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise ValueError(f"BYTES tensor has {len(view) - pos} bytes after its {count} elements")
    return out
