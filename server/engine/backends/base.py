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
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

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


@dataclasses.dataclass(frozen=True)
class Gather:
    """A batch input left in pieces because some are in device memory (CUDA shared memory inputs, see
    ``Backend.accepts_device_tensors``): host arrays and objects with ``__cuda_array_interface__``,
    in row order, each of ``shape[1:]``. The backend copies every piece to its rows on its own stream
    (device to device for device pieces), so nothing makes a round trip through host memory."""

    parts: Tuple[object, ...]
    shape: Shape
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


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
                      destinations: Sequence[DeviceDestination]) -> BatchResult:
        """``run`` that also writes outputs straight into requests' device memory where it can, saying which in
        ``BatchResult.delivered``; whatever it does not deliver the server writes from the host result."""
        return self.run(instance, inputs, outputs)

    def enqueue(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str],
                destinations: Sequence[DeviceDestination] = ()) -> object:
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
