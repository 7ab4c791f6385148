"""The region checks of a group's members (engine/group.py), and their results remembered.

A client that sends over CUDA shared memory names the same regions, offsets and sizes in request after request (one
input and one output region per request in flight). Checking a member means leasing every region it names, checking
each window against its region and each output's size against the model, and resolving device addresses: a dozen
Python calls per member, made in the engine's one loop for every member of every batch. A check that passed is
remembered by everything it read (the model version, the tensors' names, types, shapes and windows, the rows); the
next member that names the same is leased again in one locked step, and gets the same device tensors and
destinations. Any registration or unregistration forgets them all (the registry's generation), so a remembered
check never outlives a region it used.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from trtserve import dtypes
from trtserve.server.engine.backends.base import DeviceTensor
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.engine.shm.request import RequestShm, ShmRef
from trtserve.server.errors import TrtServeError

Held = Tuple[RequestShm, List[DeviceTensor], Dict[str, Tuple[int, int]]]

LIMIT = 4096  # remembered checks; past it they start over (each client holds a few windows, so this is many clients)


class MemberChecks:
    """``check(spec, msg, device_id)`` for each member; one per engine, used from its loop."""

    def __init__(self, registry: SharedMemoryRegistry, limit: int = LIMIT) -> None:
        self._registry = registry
        self._limit = limit
        self._generation = -1
        # key -> (regions to lease, names of those handed to the device, resolved outputs, input tensors, output
        # destinations)
        self._passed: Dict[tuple, Tuple[tuple, frozenset, dict, List[DeviceTensor], Dict[str, Tuple[int, int]]]] = {}
        self.remembered_hits = 0  # tests

    def check(self, spec: Any, msg: tuple, device_id: int) -> Optional[Held]:
        """A member's regions, checked and held: (its RequestShm, its inputs as device tensors, its outputs' device
        destinations); None, with nothing held, when a tensor does not lie in CUDA memory on ``device_id`` or a
        check fails (the request then goes on its own, which says why). ``spec``: the version the INFER's serial
        names (the caller checked it). The tensors and destinations are shared by every member that names the same
        windows: read them, never change them."""
        generation = self._registry.generation
        if generation != self._generation:
            self._passed.clear()
            self._generation = generation
        key = (msg[2], msg[3], msg[4], msg[5], msg[6], msg[7], device_id)  # model, version, serial, tensors, rows
        try:
            passed = self._passed.get(key)
        except TypeError:  # a list where a tuple was expected: checked every time
            key, passed = None, None
        if passed is not None:
            regions, on_device, outputs, tensors, destinations = passed
            if self._registry.lease(regions, generation):
                self.remembered_hits += 1
                return RequestShm.leased(self._registry, regions, on_device, outputs), tensors, destinations
        held = _check(self._registry.request(), spec, msg, device_id)
        if held is not None and key is not None and generation == self._registry.generation:
            if len(self._passed) >= self._limit:
                self._passed.clear()
            shm = held[0]
            self._passed[key] = (shm.held(), shm.device_regions(), dict(shm.outputs), held[1], held[2])
        return held


def _check(shm: RequestShm, spec: Any, msg: tuple, device_id: int) -> Optional[Held]:
    try:
        tensors = []
        for name, wire, shape, source in msg[5]:
            if name in spec.pad_values:  # padded on the host
                break
            t = shm.device_input(name, dtypes.BY_WIRE[wire], tuple(shape), ShmRef(source[1], source[2], source[3]),
                                 device_id)
            if t is None:
                break
            tensors.append(t)
        else:
            for name, ref, _slot in msg[6]:
                shm.add_output(name, ShmRef(*ref))
            rows = msg[7]
            for t in spec.outputs:
                shm.check_output_size(t.name, dtypes.BY_WIRE[t.datatype], (rows,) + tuple(t.dims))
            destinations = {}
            for name in shm.outputs:
                d = shm.device_destination(name, device_id)
                if d is None:
                    break
                destinations[name] = d
            else:
                return shm, tensors, destinations
    except TrtServeError:
        pass
    shm.release(finished=True)  # nothing was handed to the backend
    return None


__all__ = ["MemberChecks"]
