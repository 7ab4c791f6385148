"""Builds the load tester's request tensors from the model's metadata and config.

Shapes follow perf_analyzer's rules so the two tools load a server the same way: when the model
batches (max_batch_size > 0) the first metadata dimension is the batch, filled with ``--batch``,
and ``--shape NAME:DIMS`` gives the remaining dimensions where the metadata says -1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb

__all__ = ["TensorSpec", "make_data", "load_npz", "parse_shapes", "plan_inputs"]


@dataclass(frozen=True)
class TensorSpec:
    """One input to send: its wire datatype and full shape (batch dimension included)."""

    name: str
    datatype: str
    shape: Tuple[int, ...]


def parse_shapes(items: Sequence[str]) -> Dict[str, List[int]]:
    """``["INPUT0:64", "x:3,224,224"]`` -> {name: dims}; ValueError says which item is malformed."""
    shapes: Dict[str, List[int]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            parsed = [int(d) for d in dims.split(",") if d.strip()] if sep else None
        except ValueError:
            parsed = None
        if not name or parsed is None or any(d < 0 for d in parsed):
            raise ValueError(f"--shape {item!r}: expected NAME:D1,D2,... with non-negative integers")
        shapes[name] = parsed
    return shapes


def plan_inputs(metadata: pb.ModelMetadataResponse, max_batch_size: int, batch: int,
                shapes: Optional[Mapping[str, Sequence[int]]] = None) -> List[TensorSpec]:
    """The tensors one request carries; ValueError when a dimension is unknown or the batch does not fit."""
    shapes = dict(shapes or {})
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if max_batch_size <= 0 and batch > 1:
        raise ValueError(f"model '{metadata.name}' does not batch (max_batch_size 0); --batch {batch} needs one "
                         "that does")
    if max_batch_size > 0 and batch > max_batch_size:
        raise ValueError(f"--batch {batch} exceeds model '{metadata.name}' max_batch_size {max_batch_size}")
    unknown = sorted(set(shapes) - {t.name for t in metadata.inputs})
    if unknown:
        raise ValueError(f"--shape names {unknown}, not inputs of '{metadata.name}' "
                         f"({', '.join(t.name for t in metadata.inputs)})")
    specs = []
    for t in metadata.inputs:
        dims = list(t.shape[1:] if max_batch_size > 0 else t.shape)
        if t.name in shapes:
            given = list(shapes[t.name])
            if len(given) != len(dims) or any(d >= 0 and d != g for d, g in zip(dims, given)):
                raise ValueError(f"--shape {t.name}:{','.join(map(str, given))} does not match the model's "
                                 f"{dims} (batch dimension excluded)")
            dims = given
        if any(d < 0 for d in dims):
            raise ValueError(f"input '{t.name}' has variable dims {dims}; give them with --shape "
                             f"{t.name}:{','.join('N' if d < 0 else str(d) for d in dims)}")
        full = ([batch] if max_batch_size > 0 else []) + dims
        specs.append(TensorSpec(t.name, t.datatype, tuple(full)))
    return specs


def make_data(specs: Sequence[TensorSpec], kind: str = "random", seed: int = 0) -> Dict[str, np.ndarray]:
    """Random (floats in [0, 1), small ints, 16-byte strings) or zero tensors for ``specs``."""
    if kind not in ("random", "zero"):
        raise ValueError(f"input data must be random, zero or a .npz file, got {kind!r}")
    rng = np.random.default_rng(seed)
    out: Dict[str, np.ndarray] = {}
    for s in specs:
        dt = dtypes.from_wire(s.datatype)
        if s.datatype == "BYTES":
            flat = np.empty(int(np.prod(s.shape)), dtype=object)
            for i in range(flat.size):
                flat[i] = b"" if kind == "zero" else rng.bytes(16)
            out[s.name] = flat.reshape(s.shape)
        elif kind == "zero":
            out[s.name] = np.zeros(s.shape, dtype=dt.numpy)
        elif s.datatype == "BOOL":
            out[s.name] = rng.integers(0, 2, s.shape).astype(np.bool_)
        elif s.datatype == "BF16":
            from trtserve.client._codec import float32_to_bf16

            out[s.name] = float32_to_bf16(rng.random(s.shape, dtype=np.float32))
        elif dt.numpy.kind == "f":
            out[s.name] = rng.random(s.shape).astype(dt.numpy)
        else:
            out[s.name] = rng.integers(0, 100, s.shape).astype(dt.numpy)
    return out


def load_npz(path: str, specs: Sequence[TensorSpec]) -> Dict[str, np.ndarray]:
    """Tensors from an .npz file holding one array per input name (its shape wins over the plan)."""
    with np.load(path, allow_pickle=False) as f:
        missing = [s.name for s in specs if s.name not in f.files]
        if missing:
            raise ValueError(f"{path}: no array for input(s) {missing}; it holds {f.files}")
        return {s.name: f[s.name] for s in specs}
