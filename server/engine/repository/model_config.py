"""Internal, validated view of a model's config.pbtxt (the ModelConfig proto stays the wire form).

``ModelSpec.from_proto`` is the single place that interprets Triton's config fields and trtserve's
own ``parameters`` keys, so the batcher and backends read plain dataclasses, never protobuf.

trtserve parameters (config.pbtxt ``parameters { key: ... value: { string_value: ... } }``):
- ``trtserve.pad.<INPUT>``: pad value; marks that input's variable dimensions as paddable, so requests
  whose variable dims differ may share a batch (padded up to the batch's largest).
- ``trtserve.unpad.<OUTPUT>``: name of an input; the output's variable dims follow that input's
  variable dims position by position, so each request's output is sliced back to its own size.
- ``trtserve.batches_per_instance``: 1 or 2 (default 2): how many batches an instance may hold, the running
  one and one complete batch queued behind it, so the device does not wait for the event loop between
  batches (batcher policy rule 5). 1: a batch leaves the queue only for an idle instance, so a later
  higher-priority request can still overtake it.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Dict, Mapping, Optional, Tuple

from trtserve import dtypes
from trtserve.protos import model_config_pb2 as mc
from trtserve.server.engine.backends.base import TensorSpec
from trtserve.server.errors import ModelLoadError

PAD_PREFIX = "trtserve.pad."
UNPAD_PREFIX = "trtserve.unpad."
DEPTH_KEY = "trtserve.batches_per_instance"


@dataclasses.dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    timeout_action: str = "REJECT"  # or "DELAY"
    default_timeout_us: int = 0  # 0 = never times out in the queue
    allow_timeout_override: bool = False
    max_queue_size: int = 0  # 0 = unbounded


@dataclasses.dataclass(frozen=True)
class BatchingPolicy:
    """Triton's dynamic_batching block plus the model's max_batch_size."""

    enabled: bool = False  # dynamic_batching present; otherwise each request runs as its own batch
    max_batch_size: int = 0
    preferred_batch_sizes: Tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0  # 0 = one level
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: Mapping[int, QueuePolicy] = dataclasses.field(default_factory=dict)

    @property
    def levels(self) -> int:
        """Number of queues (priority levels are 1..levels; 1 is the highest)."""
        return max(1, self.priority_levels)

    def level_of(self, priority: int) -> int:
        """Maps a request's ``priority`` parameter (0 = default) to a level; ValueError if out of range."""
        if priority == 0:
            return self.default_priority_level if self.default_priority_level > 0 else 1
        if priority < 0 or priority > self.levels:
            raise ValueError(f"priority {priority} is outside 1..{self.levels} (0 means the model default)")
        return priority

    def queue_policy(self, level: int) -> QueuePolicy:
        return self.priority_queue_policy.get(level, self.default_queue_policy)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the server needs to know about one model version, validated."""

    name: str
    version: str
    platform: str
    max_batch_size: int
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    batching: BatchingPolicy
    instance_count: int
    parameters: Mapping[str, str]
    pad_values: Mapping[str, float]  # input -> pad value (paddable inputs only)
    unpad: Mapping[str, str]  # output -> input whose variable dims it follows
    cuda_graphs: bool = False
    batches_per_instance: int = 2
    # output -> its classification labels (config.pbtxt label_filename, one label per line), line i for class i
    labels: Mapping[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def batches(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> Optional[TensorSpec]:
        return self._by_name[0].get(name)

    def output(self, name: str) -> Optional[TensorSpec]:
        return self._by_name[1].get(name)

    @functools.cached_property
    def _by_name(self) -> Tuple[Dict[str, TensorSpec], Dict[str, TensorSpec]]:
        """Inputs and outputs by name: the engine looks an output up for every request it answers."""
        return {t.name: t for t in self.inputs}, {t.name: t for t in self.outputs}

    @classmethod
    def from_proto(cls, config: mc.ModelConfig, version: str,
                   model_dir: Optional[pathlib.Path] = None) -> "ModelSpec":
        """Builds and checks the spec from a (complete) ``inference.ModelConfig`` message; ``model_dir`` (the
        model's folder) is where outputs' label files are read from."""
        name = config.name
        if config.max_batch_size < 0:
            raise ModelLoadError(f"model '{name}': max_batch_size must be >= 0, got {config.max_batch_size}")
        inputs = tuple(_tensor(name, "input", t, t.data_type, t.dims, t.optional) for t in config.input)
        outputs = tuple(_tensor(name, "output", t, t.data_type, t.dims, False) for t in config.output)
        if not inputs or not outputs:
            raise ModelLoadError(f"model '{name}': config declares {len(inputs)} inputs and {len(outputs)} outputs; "
                                 "both must be at least 1")
        for kind, group in (("input", inputs), ("output", outputs)):
            seen = set()
            for t in group:
                if t.name in seen:
                    raise ModelLoadError(f"model '{name}': {kind} '{t.name}' is declared twice")
                seen.add(t.name)
        params = {k: v.string_value for k, v in config.parameters.items()}
        pad_values: Dict[str, float] = {}
        unpad: Dict[str, str] = {}
        for key, value in params.items():
            if key.startswith(PAD_PREFIX):
                tname = key[len(PAD_PREFIX):]
                if not any(t.name == tname for t in inputs):
                    raise ModelLoadError(f"model '{name}': parameter '{key}' names unknown input '{tname}'")
                try:
                    pad_values[tname] = float(value)
                except ValueError:
                    raise ModelLoadError(f"model '{name}': parameter '{key}' must be a number, got {value!r}") from None
            elif key.startswith(UNPAD_PREFIX):
                oname = key[len(UNPAD_PREFIX):]
                if not any(t.name == oname for t in outputs) or not any(t.name == value for t in inputs):
                    raise ModelLoadError(f"model '{name}': parameter '{key}' must map an output to an input, "
                                         f"got {oname!r} -> {value!r}")
                unpad[oname] = value
        batching = _batching(config)
        count = sum(max(1, g.count) for g in config.instance_group) if config.instance_group else 1
        graphs = bool(config.optimization.cuda.graphs) if config.HasField("optimization") else False
        return cls(
            name=name, version=version, platform=config.platform or config.backend,
            max_batch_size=config.max_batch_size, inputs=inputs, outputs=outputs, batching=batching,
            instance_count=count, parameters=params, pad_values=pad_values, unpad=unpad, cuda_graphs=graphs,
            batches_per_instance=batches_per_instance(name, params),
            labels=_labels(name, config, model_dir),
        )


def _labels(model: str, config: mc.ModelConfig, model_dir: Optional[pathlib.Path]) -> Dict[str, Tuple[str, ...]]:
    """Each output's label file (Triton's label_filename, a file in the model's folder, one label per line);
    a file that is missing or outside the folder fails the load."""
    out: Dict[str, Tuple[str, ...]] = {}
    for t in config.output:
        if not t.label_filename:
            continue
        if model_dir is None:
            raise ModelLoadError(f"model '{model}': output '{t.name}': label_filename needs the model's folder")
        root = pathlib.Path(model_dir).resolve()
        path = (root / t.label_filename).resolve()
        if root not in path.parents:
            raise ModelLoadError(f"model '{model}': output '{t.name}': label_filename {t.label_filename!r} is not "
                                 "a file in the model's folder")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"model '{model}': output '{t.name}': cannot read label_filename "
                                 f"{t.label_filename!r}: {getattr(e, 'strerror', None) or e}") from None
        out[t.name] = tuple(line.rstrip("\r") for line in text.split("\n"))
    return out


def batches_per_instance(model: str, params: Mapping[str, str]) -> int:
    """``trtserve.batches_per_instance`` (default 2); the backend needs it before the spec exists, to size
    its staging buffers."""
    raw = params.get(DEPTH_KEY, "2").strip()
    if raw not in ("1", "2"):
        raise ModelLoadError(f"model '{model}': parameter '{DEPTH_KEY}' must be 1 or 2, got {raw!r}")
    return int(raw)


def _tensor(model: str, kind: str, t, data_type: int, dims, optional: bool) -> TensorSpec:
    enum_name = mc.DataType.Name(data_type)
    if enum_name not in dtypes.BY_CONFIG:
        raise ModelLoadError(f"model '{model}': {kind} '{t.name}' has unsupported data_type {enum_name}")
    for d in dims:
        if d == 0 or d < -1:
            raise ModelLoadError(f"model '{model}': {kind} '{t.name}' has invalid dims {list(dims)} "
                                 "(each must be > 0 or -1)")
    return TensorSpec(t.name, dtypes.BY_CONFIG[enum_name].wire, tuple(int(d) for d in dims), optional)


def _queue_policy(p) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=mc.ModelQueuePolicy.TimeoutAction.Name(p.timeout_action),
        default_timeout_us=int(p.default_timeout_microseconds),
        allow_timeout_override=bool(p.allow_timeout_override),
        max_queue_size=int(p.max_queue_size),
    )


def _batching(config) -> BatchingPolicy:
    name = config.name
    if config.WhichOneof("scheduling_choice") != "dynamic_batching":
        return BatchingPolicy(enabled=False, max_batch_size=config.max_batch_size)
    db = config.dynamic_batching
    if config.max_batch_size == 0:
        raise ModelLoadError(f"model '{name}': dynamic_batching needs max_batch_size > 0")
    for p in db.preferred_batch_size:
        if p <= 0 or p > config.max_batch_size:
            raise ModelLoadError(f"model '{name}': preferred_batch_size {p} is outside 1..{config.max_batch_size}")
    levels = int(db.priority_levels)
    if levels and not (1 <= db.default_priority_level <= levels):
        raise ModelLoadError(f"model '{name}': default_priority_level {db.default_priority_level} "
                             f"is outside 1..{levels}")
    per_level = {int(k): _queue_policy(v) for k, v in db.priority_queue_policy.items()}
    for k in per_level:
        if not (1 <= k <= max(1, levels)):
            raise ModelLoadError(f"model '{name}': priority_queue_policy for level {k} but priority_levels is {levels}")
    return BatchingPolicy(
        enabled=True, max_batch_size=config.max_batch_size,
        preferred_batch_sizes=tuple(sorted(set(int(p) for p in db.preferred_batch_size))),
        max_queue_delay_us=int(db.max_queue_delay_microseconds), preserve_ordering=bool(db.preserve_ordering),
        priority_levels=levels, default_priority_level=int(db.default_priority_level),
        default_queue_policy=_queue_policy(db.default_queue_policy), priority_queue_policy=per_level,
    )
