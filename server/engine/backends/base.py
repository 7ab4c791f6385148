"""The backend contract: what the batcher and executor need from a runtime (ONNX Runtime, TensorRT).

Lifecycle: the constructor only stores its ``BackendConfig``; ``open()`` loads (slow: engine build,
session creation; called off the event loop); ``run()`` executes one batch on one instance, called by one
thread at a time for that instance (its own thread, or the engine's loop; one instance = one execution
context + one stream, or one ONNX Runtime session slot), so an instance never runs two batches at once; ``close()``
releases everything. Backends never see gRPC or the batcher.

A ``pipelined`` backend (TensorRT) splits a batch in two: ``enqueue`` starts it on the device and returns,
``collect`` waits for it. In the engine process the event loop enqueues, the instance's completion thread waits
(``wait``) and the loop collects; in the single-process server the instance's thread enqueues, and collects too unless another batch is
queued behind it (then the completion thread does). Either way the next batch is enqueued behind the running
one, so the device never waits for Python between batches; at most ``BackendConfig.batches_per_instance``
batches of an instance are enqueued at once, and one thread at a time calls ``staging`` and ``enqueue``.
"""
from __future__ import annotations

import abc
import dataclasses
import pathlib
from typing import Any, Callable, Dict, FrozenSet, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output. ``dims`` excludes the batch dimension when the model batches
    (max_batch_size > 0), as in config.pbtxt; -1 marks a variable dimension."""

    name: str
    datatype: str  # wire name, e.g. "FP32"
    dims: Shape
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    """min/opt/max of one input in one optimization profile; full shapes, batch dimension included."""

    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for d, lo, hi in zip(shape, self.min, self.max))


@dataclasses.dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile (or any shape-range contract) and the instances that serve it."""

    index: int
    inputs: Mapping[str, ShapeRange]
    instances: Tuple[int, ...]

    def fits(self, shapes: Mapping[str, Shape]) -> bool:
        """True if every input shape (batch included) lies inside this profile's min/max."""
        return all(name not in self.inputs or self.inputs[name].contains(s) for name, s in shapes.items())

    def distance(self, shapes: Mapping[str, Shape]) -> int:
        """Manhattan distance to ``opt`` over every input (Triton's GetMostOptimizedProfile rule)."""
        return sum(
            abs(d - o) for name, s in shapes.items() if name in self.inputs for d, o in zip(s, self.inputs[name].opt)
        )

    def describe(self) -> str:
        return f"profile {self.index} (" + "; ".join(
            f"{n}: min {list(r.min)} max {list(r.max)}" for n, r in self.inputs.items()
        ) + ")"


class PieceColumns:
    """Host pieces of one size (``nbytes`` each), each in page-locked memory, as columns: ``addresses`` (int64, in
    row order) and ``blocks`` (int64, the memory block each lies in: a copy never spans two, see tensorrt/copies.py).
    A group of large requests hands its inputs over so (engine/group.py): the backend plans their copies with array
    arithmetic over the addresses instead of reading an array object per member, which the engine's one loop would
    pay for every member of every batch. ``views`` makes the pieces as arrays, for whatever reads them one by one."""

    __slots__ = ("addresses", "blocks", "nbytes", "_views")

    def __init__(self, addresses: np.ndarray, blocks: np.ndarray, nbytes: int,
                 views: Callable[[], Tuple[np.ndarray, ...]]) -> None:
        self.addresses = addresses
        self.blocks = blocks
        self.nbytes = nbytes
        self._views = views

    def __len__(self) -> int:
        return len(self.addresses)

    def views(self) -> Tuple[np.ndarray, ...]:
        return self._views()

    def __getitem__(self, part: slice) -> "PieceColumns":
        return PieceColumns(self.addresses[part], self.blocks[part], self.nbytes, lambda: self._views()[part])

    @staticmethod
    def join(columns: Sequence["PieceColumns"]) -> Optional["PieceColumns"]:
        """The pieces of several entries of a batch, one after the other; None when their sizes differ."""
        if len({c.nbytes for c in columns}) != 1:
            return None
        return PieceColumns(np.concatenate([c.addresses for c in columns]), np.concatenate([c.blocks for c in columns]),
                            columns[0].nbytes, lambda: tuple(v for c in columns for v in c.views()))


class Gather:
    """A batch input left in pieces because some are in device memory (CUDA shared memory inputs, see
    ``Backend.accepts_device_tensors``) or in page-locked host memory the device copies from directly: host arrays
    and objects with ``__cuda_array_interface__``, in row order, each of ``shape[1:]``. The backend copies every
    piece to its rows on its own stream (device to device for device pieces), so nothing makes a round trip through
    host memory. ``columns``: the same pieces as PieceColumns (host pieces of a group of large requests); ``parts``
    is then made from them only if something asks for it."""

    __slots__ = ("_parts", "shape", "dtype", "columns")

    def __init__(self, parts: Optional[Tuple[object, ...]], shape: Shape, dtype: np.dtype,
                 columns: Optional[PieceColumns] = None) -> None:
        if parts is None and columns is None:
            raise ValueError("a Gather needs its pieces, as parts or as columns")
        self._parts = parts
        self.shape = shape
        self.dtype = dtype
        self.columns = columns

    @property
    def parts(self) -> Tuple[object, ...]:
        if self._parts is None:
            assert self.columns is not None
            self._parts = self.columns.views()
        return self._parts

    @property
    def count(self) -> int:
        """How many pieces, without making them."""
        return len(self.columns) if self._parts is None and self.columns is not None else len(self.parts)

    def split(self, k: int, head_rows: int) -> Tuple["Gather", "Gather"]:
        """The first ``k`` pieces (``head_rows`` rows) and the others, as two Gathers."""
        cols = self.columns
        rest = (self.shape[0] - head_rows,) + tuple(self.shape[1:])
        head_parts = tail_parts = None
        if self._parts is not None:
            head_parts, tail_parts = self._parts[:k], self._parts[k:]
        return (Gather(head_parts, (head_rows,) + tuple(self.shape[1:]), self.dtype,
                       None if cols is None else cols[:k]),
                Gather(tail_parts, rest, self.dtype, None if cols is None else cols[k:]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Gather(shape={self.shape}, dtype={self.dtype}, pieces={self.count})"


@dataclasses.dataclass(frozen=True)
class DeviceTensor:
    """An input that stays in a client's CUDA shared-memory region: what a backend with
    ``accepts_device_tensors`` receives instead of a NumPy array (see docs/shared-memory.md).

    ``__cuda_array_interface__`` makes ``cupy.asarray(t)`` a zero-copy view; the backend must copy
    it (device to device, on its own stream) before the request's answer is sent, because the
    mapping is only guaranteed until then.
    """

    ptr: int
    nbytes: int
    shape: Tuple[int, ...]
    dtype: np.dtype
    device_id: int
    region: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, True), "version": 3,
                "strides": None}


def is_host(array: object) -> bool:
    """True for a NumPy array; False for device tensors and ``Gather``."""
    return isinstance(array, np.ndarray)


@dataclasses.dataclass(frozen=True)
class DeviceDestination:
    """Outputs one request of a batch wants written by the device itself: its rows of each named output go to
    ``(pointer, bytes available)``, in device memory (CUDA shared memory) or in page-locked host memory (a front
    end's arena the engine registered with CUDA; see ``Backend.direct_copy_min_bytes``). Only given to backends
    with ``accepts_device_tensors``. A batch entry that stands for several requests (engine/group.py) has one per
    member, all with the entry's ``request`` index."""

    request: int  # index of the request in the batch
    row_offset: int
    rows: int
    outputs: Mapping[str, Tuple[int, int]]
    # which memory block the outputs lie in: copies into one block may go in one call (tensorrt/copies.py), copies
    # into two never do. None: the request's (one request's memory, or a group's members in one arena); members of a
    # group whose memory lies apart (several clients' CUDA shared memory) each have their own
    block: Optional[int] = None
    # every output pointer is device memory (CUDA shared memory on the model's GPU): such copies may go as one kernel
    # launch for the whole batch (tensorrt/pieces.py); False: CUDA tells from the address at copy time
    on_device: bool = False


@dataclasses.dataclass(frozen=True)
class MemberDestinations:
    """The DeviceDestinations of a group's ``count`` members as columns (engine/group.py): member k's rows of the
    batch are ``row_offset + k * rows`` on, and its rows of output ``name`` go to ``outputs[name][0][k]``, which has
    room for ``outputs[name][1][k]`` bytes (every member names the same outputs). All carry the entry's ``request``
    index. Members in one block (their front end's page-locked arena) come as int64 arrays, which a backend plans
    its copies from with array arithmetic. ``apart``: each member's memory is a block of its own in device memory
    (clients' CUDA shared memory: DeviceDestination's ``block`` and ``on_device`` for each); those come as lists,
    since each is copied on its own anyway."""

    request: int
    row_offset: int
    rows: int  # each member's
    count: int
    outputs: Mapping[str, Tuple[Sequence[int], Sequence[int]]]
    apart: bool = False

    def members(self) -> Iterator[DeviceDestination]:
        """Each member's DeviceDestination, for a backend that copies them one by one."""
        names = tuple(self.outputs)
        columns = [tuple(c.tolist() if isinstance(c, np.ndarray) else c for c in pair)
                   for pair in self.outputs.values()]
        for k in range(self.count):
            row = self.row_offset + k * self.rows
            outputs = {n: (c[0][k], c[1][k]) for n, c in zip(names, columns)}
            if self.apart:
                yield DeviceDestination(self.request, row, self.rows, outputs, -1 - row, True)
            else:
                yield DeviceDestination(self.request, row, self.rows, outputs)


def each_destination(destinations: Sequence["Destination"]) -> Iterator[DeviceDestination]:
    """A batch's destinations one request or member at a time (a group's columns taken apart)."""
    for d in destinations:
        if type(d) is MemberDestinations:
            yield from d.members()
        else:
            yield d  # type: ignore[misc]


# what a batch's ``destinations`` hold: a request's own, or a group's members' as columns
Destination = Union[DeviceDestination, MemberDestinations]


@dataclasses.dataclass
class BatchResult:
    """Outputs of one batch, with the time spent in each stage (Triton's compute_input/infer/output)."""

    outputs: Dict[str, np.ndarray]
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    # request index -> outputs already written to every DeviceDestination of that index (the server skips them)
    delivered: Dict[int, FrozenSet[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """What a backend is told about the model it serves (built by the repository from config.pbtxt)."""

    name: str
    version: str
    model_dir: pathlib.Path  # the version folder, e.g. <repo>/mlp/1
    default_model_filename: str  # "" -> the backend's default (model.onnx, model.plan)
    max_batch_size: int
    inputs: Sequence[TensorSpec]  # empty -> the backend declares them (auto-complete)
    outputs: Sequence[TensorSpec]
    instance_count: int = 1
    parameters: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cuda_graphs: bool = False
    cache_dir: Optional[pathlib.Path] = None
    device_id: int = 0
    # batches the batcher may hand one instance at once (ModelSpec.batches_per_instance): a pipelined backend
    # keeps that many sets of host staging buffers per instance
    batches_per_instance: int = 2


class Backend(abc.ABC):
    """One model version loaded on one runtime."""

    platform: str = ""  # reported by ModelMetadata / ModelConfig, e.g. "onnxruntime_onnx", "tensorrt_plan"
    # True: CUDA shared-memory inputs arrive as device tensors (and batches of them as ``Gather``), which
    # ``run`` copies device to device; False: the server copies them to host memory first
    accepts_device_tensors: bool = False
    # True: ``enqueue`` returns before the batch ends and ``collect`` waits for it (see the module docstring)
    pipelined: bool = False
    # not None (backends with ``accepts_device_tensors``): a request's input or output of at least this many bytes
    # in page-locked host memory (the arena) is copied between it and the device directly, one copy per request,
    # instead of through the instance's pinned buffer and host copies; below it one copy per batch costs less
    direct_copy_min_bytes: Optional[int] = None

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def open(self) -> None:
        """Loads the model and creates every instance. Blocking; raises ModelLoadError naming the tensor."""

    @abc.abstractmethod
    def io(self) -> Tuple[Sequence[TensorSpec], Sequence[TensorSpec]]:
        """(inputs, outputs) as the model file declares them; valid after open()."""

    def profiles(self) -> Sequence[Profile]:
        """Shape ranges the batcher must respect; empty means any shape allowed by the dims."""
        return ()

    def instance_count(self) -> int:
        return self.config.instance_count

    def check_request(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Backend-specific checks of one request before it joins a batch (raise InvalidArgument),
        so data this runtime cannot take fails that request alone, not its whole batch."""

    def staging(self, instance: int, shapes: Mapping[str, Shape]) -> Optional[Dict[str, np.ndarray]]:
        """Writable host arrays of exactly these (full) shapes that ``run`` on ``instance`` reads in place,
        or None. The batcher stacks a batch's requests straight into them, saving an allocation and
        one copy of every input per batch (TensorRT: the instance's pinned staging buffers). Called right
        before ``run`` or ``enqueue``, on the thread that calls them."""
        return None

    @abc.abstractmethod
    def run(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str]) -> BatchResult:
        """Runs one batch on ``instance``. One thread at a time per instance: its own thread, or the engine's
        loop when that serves nothing else (see DynamicBatcher)."""

    def run_to_device(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str],
                      destinations: Sequence[Destination]) -> BatchResult:
        """``run`` that also writes outputs straight into requests' device memory where it can, saying which in
        ``BatchResult.delivered``; whatever it does not deliver the server writes from the host result."""
        return self.run(instance, inputs, outputs)

    def enqueue(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str],
                destinations: Sequence[Destination] = ()) -> object:
        """Starts one batch on ``instance`` from its thread and returns a ticket for ``collect``. Batches of an
        instance are collected in the order they were enqueued. Default: runs the whole batch (the result is
        the ticket)."""
        if destinations:
            return self.run_to_device(instance, inputs, outputs, destinations)
        return self.run(instance, inputs, outputs)

    def collect(self, instance: int, ticket: object) -> BatchResult:
        """Waits for a batch ``enqueue`` started; once per ticket. Raises what the batch failed with."""
        assert isinstance(ticket, BatchResult)
        return ticket

    def wait(self, instance: int, ticket: object) -> bool:
        """Blocks until the batch ``enqueue`` started has finished on the device, so that ``collect`` returns at
        once, and says True; on another thread than ``collect`` (the engine's completion thread, while its loop
        goes on). An error here is left for ``collect`` to raise. False (the default): this backend cannot wait
        apart from collecting, and ``collect`` runs on the waiting thread."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Releases every resource; the backend is unusable afterwards."""
