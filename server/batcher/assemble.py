"""Pure NumPy: concatenate (and pad) requests into one batch; slice outputs back per request."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from trtserve.server.batcher.request import Pending, Shape
from trtserve.server.errors import Internal


def stack(requests: Sequence[Pending], shapes: Mapping[str, Shape], pad_values: Mapping[str, float],
          batches: bool) -> Dict[str, np.ndarray]:
    """Batch inputs: rows concatenated along dim 0, paddable dims filled with the input's pad value."""
    if not batches or len(requests) == 1 and all(requests[0].shapes[n] == s for n, s in shapes.items()):
        return {n: np.asarray(a) for n, a in requests[0].inputs.items()}
    rows = sum(r.rows for r in requests)
    out: Dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        parts = [r.inputs[name] for r in requests]
        if all(p.shape[1:] == shape for p in parts):
            out[name] = np.concatenate(parts, axis=0)
            continue
        batch = np.full((rows,) + tuple(shape), pad_values.get(name, 0), dtype=parts[0].dtype)
        offset = 0
        for p in parts:
            batch[(slice(offset, offset + p.shape[0]),) + tuple(slice(0, d) for d in p.shape[1:])] = p
            offset += p.shape[0]
        out[name] = batch
    return out


def split(outputs: Mapping[str, np.ndarray], requests: Sequence[Pending],
          unpad: Mapping[str, Tuple[str, Tuple[int, ...]]], batches: bool) -> Sequence[Dict[str, np.ndarray]]:
    """Each request's requested outputs: its rows, and for outputs that follow a padded input
    (``trtserve.unpad.<output>``), its own extent along the variable dimensions."""
    if not batches:
        return [{n: outputs[n] for n in requests[0].outputs}]
    rows = sum(r.rows for r in requests)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise Internal(f"output '{name}' has shape {list(arr.shape)} but the batch has {rows} rows; the "
                           "backend must keep the batch dimension")
    result = []
    offset = 0
    for r in requests:
        mine = {}
        for name in r.outputs:
            arr = outputs[name][offset:offset + r.rows]
            follow = unpad.get(name)
            if follow is not None and follow[0] in r.shapes:
                own = r.shapes[follow[0]]
                index = [slice(None)] * arr.ndim
                for i in follow[1]:  # the output's variable (non-batch) dims that exist in the input too
                    if i < len(own):
                        index[i + 1] = slice(0, own[i])
                arr = arr[tuple(index)]
            mine[name] = arr
        result.append(mine)
        offset += r.rows
    return result
