"""Checks one decoded request against its model before it may join a batch.

A request that fails here is answered INVALID_ARGUMENT on its own and never reaches a batch, so
its bad data cannot fail the requests it would have been batched with.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from trtserve.server.errors import InvalidArgument
from trtserve.server.engine.repository.model_config import ModelSpec


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
