"""Requests shaped alike are checked and laid out in the arena once.

Under load a front end sees the same request again and again with other data: the same model, input names,
datatypes and shapes, the same outputs. For a plain request (its data in ``raw_input_contents``, no tensor
parameters, no BYTES inputs) everything ``validation.precheck`` decides is fixed by its ``signature``: the
inputs' names, datatypes and shapes in order, the raw entries' lengths (one per input) and the requested output
names. So the verdict of the first such request, and where its inputs and output slots lie in its arena block,
are kept per model version and signature; the next ones cost the signature and the copy of their bytes.
A request that fails its check is never kept (the next one is checked again and gets the same answer), and
any other request takes the general path (service.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.engine.repository.model_config import ModelSpec
from trtserve.server.frontend.validation import Prechecked, precheck
from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import Arena, aligned

# signatures kept per model version, and model versions kept: a client that sends ever new shapes (variable
# dims) makes the front end start over now and then instead of growing
MAX_SIGNATURES = 256
MAX_MODELS = 64


def output_bytes(spec: ModelSpec, name: str, rows: int) -> Optional[int]:
    """Bytes an output of a request of ``rows`` rows takes, when its shape is fixed; None otherwise."""
    t = spec.output(name)
    if t is None or t.datatype == "BYTES" or any(d < 0 for d in t.dims):
        return None
    n = dtypes.BY_WIRE[t.datatype].itemsize * (rows if spec.batches else 1)
    for d in t.dims:
        n *= d
    return n


def layout(input_sizes: Sequence[int], output_sizes: Sequence[Optional[int]],
           ) -> Tuple[int, List[int], List[Optional[int]]]:
    """(block bytes, each input's offset in the block, each output slot's offset or None): inputs first, then a
    slot for every output whose size is known, each aligned."""
    offset = 0
    inputs = []
    for n in input_sizes:
        inputs.append(offset)
        offset += aligned(n)
    outputs: List[Optional[int]] = []
    for size in output_sizes:
        if size:
            outputs.append(offset)
            offset += aligned(size)
        else:
            outputs.append(None)
    return offset, inputs, outputs


def signature(request: pb.ModelInferRequest, datas: List[bytes], max_inputs: int, max_outputs: int,
              ) -> Optional[tuple]:
    """What precheck's verdict on a plain request depends on besides the model, or None for any other request.
    ``datas`` receives the request's raw entries (reading one copies it: it is read once, here). A request with
    more inputs or outputs than the model has, or not one raw entry per input, is left to precheck before anything
    is read, so the work here stays bounded by the model, as precheck's does."""
    raw = request.raw_input_contents
    if len(request.inputs) > max_inputs or len(request.outputs) > max_outputs or len(raw) != len(request.inputs):
        return None
    inputs = []
    for t in request.inputs:
        if t.parameters or t.datatype == "BYTES" or t.HasField("contents"):
            return None
        inputs.append((t.name, t.datatype, tuple(t.shape)))
    outputs = []
    for o in request.outputs:
        if o.parameters:
            return None
        outputs.append(o.name)
    datas.extend(raw)
    return tuple(inputs), tuple([len(d) for d in datas]), tuple(outputs)


class Plan:
    """A checked request shape and its arena layout: what a request of that shape puts where."""

    __slots__ = ("checked", "total", "inputs", "outputs")

    def __init__(self, spec, checked: Prechecked, names: Sequence[Tuple[str, str]], sizes: Sequence[int]) -> None:
        self.checked = checked
        slot_sizes = [output_bytes(spec, out, checked.rows) for out in checked.outputs]
        self.total, offsets, slots = layout(sizes, slot_sizes)
        # as ``place`` takes them: no output of a plain request goes to shared memory
        self.inputs = tuple((name, wire, checked.shapes[name], offset, n)
                            for (name, wire), offset, n in zip(names, offsets, sizes))
        self.outputs = tuple((name, None, offset, size)
                             for name, offset, size in zip(checked.outputs, slots, slot_sizes))

    def stage(self, arena: Arena, block: Optional[int], datas: Sequence[bytes]) -> Tuple[tuple, tuple]:
        """Copies ``datas`` (the raw entries, one per input) into ``arena`` at ``block``; returns the INFER's input
        and output descriptors (messages.py)."""
        return place(arena, block or 0, self.inputs, datas, self.outputs)


def place(arena: Arena, base: int, inputs: Sequence[Tuple[str, str, tuple, int, int]], datas: Sequence[bytes],
          outputs: Sequence[Tuple[str, Optional[tuple], Optional[int], Optional[int]]]) -> Tuple[tuple, tuple]:
    """Copies each input's bytes to its offset in the block at ``base`` and returns the INFER's input and output
    descriptors. ``inputs``: (name, datatype, shape, offset in the block, bytes), ``datas`` their bytes in that
    order; ``outputs``: (name, shared-memory reference or None, slot offset or None, slot bytes)."""
    placed = []
    for i, (name, wire, shape, offset, n) in enumerate(inputs):
        at = base + offset
        if n:
            arena.put(at, datas[i])
        placed.append((name, wire, shape, (m.ARENA, at, n)))
    return tuple(placed), tuple([(name, shm_ref, None if offset is None else (base + offset, size))
                                 for name, shm_ref, offset, size in outputs])


class Plans:
    """Plans per model version (its ModelSpec, which a reload replaces) and signature."""

    def __init__(self) -> None:
        self._models: Dict[int, Tuple[object, Dict[tuple, Plan]]] = {}  # id(spec) -> (spec, plans)

    def find(self, spec: ModelSpec, request: pb.ModelInferRequest, max_input_bytes: Optional[int],
             datas: List[bytes]) -> Optional[Plan]:
        """The plan of a plain request (checking it when its shape is new: InvalidArgument as precheck), or None
        when the request is not plain. ``datas`` receives its raw entries, to pass to ``Plan.stage``."""
        key = signature(request, datas, len(spec.inputs), len(spec.outputs))
        if key is None:
            return None
        entry = self._models.get(id(spec))
        if entry is None or entry[0] is not spec:
            if len(self._models) >= MAX_MODELS:
                self._models.clear()
            entry = self._models[id(spec)] = (spec, {})
        plans = entry[1]
        plan = plans.get(key)
        if plan is None:
            checked = precheck(spec, request, max_input_bytes)
            plan = Plan(spec, checked, [(name, wire) for name, wire, _shape in key[0]], key[1])
            if len(plans) >= MAX_SIGNATURES:
                plans.clear()
            plans[key] = plan
        return plan


__all__ = ["Plan", "Plans", "layout", "output_bytes", "place", "signature"]
