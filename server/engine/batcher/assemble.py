"""Pure NumPy: concatenate (and pad) requests into one batch; slice outputs back per request."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve.server.engine.backends.base import Gather, PieceColumns, is_host
from trtserve.server.engine.batcher.request import Pending, Shape
from trtserve.server.errors import Internal


def stack(requests: Sequence[Pending], shapes: Mapping[str, Shape], pad_values: Mapping[str, float],
          batches: bool, out: Optional[Mapping[str, np.ndarray]] = None,
          gather_min_bytes: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Batch inputs: rows concatenated along dim 0, paddable dims filled with the input's pad value.
    ``out`` (the backend's staging arrays of the batch's full shapes) receives the batch in place.
    ``gather_min_bytes`` (``Backend.direct_copy_min_bytes``): host inputs whose every request holds at least
    that many bytes are left in pieces (``Gather``), which the backend copies to the device one by one from
    where they lie, instead of concatenating them first."""
    if not batches or len(requests) == 1 and all(requests[0].shapes[n] == s for n, s in shapes.items()):
        return {n: a if is_host(a) or isinstance(a, Gather) or hasattr(a, "__cuda_array_interface__")
                else np.asarray(a) for n, a in requests[0].inputs.items()}
    rows = sum(r.rows for r in requests)
    batched: Dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        ins = [r.inputs[name] for r in requests]
        joined = _joined(ins, tuple(shape)) if gather_min_bytes is not None else None
        if joined is not None:  # groups of large requests, each in columns: the batch too
            batched[name] = Gather(None, (rows,) + tuple(shape), ins[0].dtype, joined)
            continue
        # an entry standing for several requests may hold its input in pieces (engine/group.py): one piece each
        parts = [p for a in ins for p in _pieces(a)]
        if gather_min_bytes is not None and all(is_host(p) and p.nbytes >= gather_min_bytes
                                                and p.shape[1:] == shape for p in parts):
            batched[name] = Gather(tuple(parts), (rows,) + tuple(shape), np.dtype(parts[0].dtype))
            continue
        if not all(is_host(p) for p in parts):  # device tensors: the backend copies each piece in place
            if not all(p.shape[1:] == shape for p in parts):
                raise Internal(f"input '{name}': device tensors cannot be padded (the server stages paddable "
                               "inputs through host memory)")
            batched[name] = Gather(tuple(parts), (rows,) + tuple(shape), np.dtype(parts[0].dtype))
            continue
        dst = out.get(name) if out is not None else None
        if dst is not None and (dst.shape != (rows,) + tuple(shape) or dst.dtype != parts[0].dtype):
            dst = None  # not this batch's layout: build it in fresh memory
        if all(p.shape[1:] == shape for p in parts):
            batched[name] = np.concatenate(parts, axis=0, out=dst)
            continue
        if dst is None:
            batch = np.full((rows,) + tuple(shape), pad_values.get(name, 0), dtype=parts[0].dtype)
        else:
            batch = dst
            batch.fill(pad_values.get(name, 0))
        offset = 0
        for p in parts:
            batch[(slice(offset, offset + p.shape[0]),) + tuple(slice(0, d) for d in p.shape[1:])] = p
            offset += p.shape[0]
        batched[name] = batch
    return batched


def _joined(ins: Sequence[object], shape: Shape) -> Optional[PieceColumns]:
    """The entries' pieces as one set of columns, where every entry holds its input as columns of one type."""
    if not all(isinstance(a, Gather) and a.columns is not None and a.shape[1:] == shape for a in ins):
        return None
    if len({a.dtype for a in ins}) != 1:  # type: ignore[attr-defined]
        return None
    return PieceColumns.join([a.columns for a in ins])  # type: ignore[attr-defined,misc]


def _pieces(a: object) -> Sequence[object]:
    return a.parts if isinstance(a, Gather) else (a,)


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
