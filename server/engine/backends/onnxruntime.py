"""ONNX Runtime on CPU: the embedded default backend, so ``trtserve serve`` works on any machine.

One InferenceSession is shared by every instance: ``InferenceSession.run`` is thread-safe, and each
instance's thread runs one batch at a time, so ``instance_group.count`` sets how many batches run at
once. Intra-op threads are split between instances (one core left to the front end) so two batches
do not fight over every core; ``trtserve.intra_op_threads`` overrides it.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve.server.engine.backends.base import Backend, BatchResult, TensorSpec
from trtserve.server.errors import Internal, InvalidArgument, ModelLoadError

# ONNX Runtime type strings -> wire datatypes
_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(bfloat16)": "BF16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL", "tensor(string)": "BYTES",
}


_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16 (onnx itself is not a runtime dependency)


def _to_str(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=object)
    out.reshape(-1)[:] = [b.decode("utf-8") for b in arr.reshape(-1)]
    return out


def _dims(shape) -> Tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


class OnnxRuntimeBackend(Backend):
    platform = "onnxruntime_onnx"

    def __init__(self, config) -> None:
        super().__init__(config)
        self._session = None
        self._io: Optional[Tuple[Sequence[TensorSpec], Sequence[TensorSpec]]] = None
        self._bf16: frozenset = frozenset()  # BF16 inputs and outputs: NumPy has no bfloat16 (see _run_bf16)
        self._ort = None

    def open(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError(f"model '{self.config.name}': onnxruntime is not installed "
                                 "(pip install 'trtserve[cpu]')") from None
        path = self.config.model_dir / (self.config.default_model_filename or "model.onnx")
        if not path.is_file():
            raise ModelLoadError(f"model '{self.config.name}': {path} does not exist")
        opts = ort.SessionOptions()
        threads = self.config.parameters.get("trtserve.intra_op_threads")
        cores = usable_cpus()
        # one core stays with the gRPC front end: measured on 2 cores (bench.batching, wide model, c=32),
        # ORT on both cores starved the event loop that fills the queue (497 req/s, mean batch 6.7);
        # with one intra-op thread the queue fills while a batch runs (832 req/s, mean batch 10.5)
        opts.intra_op_num_threads = int(threads) if threads else max(1, (cores - 1) // max(1, self.config.instance_count))
        opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types; the message says what is wrong
            raise ModelLoadError(f"model '{self.config.name}': ONNX Runtime cannot load {path}: {e}") from None
        ins, outs = [], []
        for kind, metas, out in (("input", self._session.get_inputs(), ins),
                                 ("output", self._session.get_outputs(), outs)):
            for m in metas:
                if m.type not in _ORT_TYPES:
                    raise ModelLoadError(f"model '{self.config.name}': {kind} '{m.name}' has unsupported type {m.type}")
                out.append(TensorSpec(m.name, _ORT_TYPES[m.type], _dims(m.shape)))
        self._io = (tuple(ins), tuple(outs))
        self._bf16 = frozenset(t.name for t in ins + outs if t.datatype == "BF16")
        self._bytes_inputs = any(t.datatype == "BYTES" for t in ins)
        if self._bf16 and not hasattr(ort.OrtValue, "ortvalue_from_numpy_with_onnx_type"):
            self._session = None
            raise ModelLoadError(f"model '{self.config.name}': BF16 tensors ({', '.join(sorted(self._bf16))}) need "
                                 f"OrtValue.ortvalue_from_numpy_with_onnx_type, which onnxruntime {ort.__version__} "
                                 "lacks; upgrade onnxruntime (tested with 1.32)")
        self._ort = ort

    def io(self) -> Tuple[Sequence[TensorSpec], Sequence[TensorSpec]]:
        if self._io is None:
            raise RuntimeError("io() before open()")
        return self._io

    def check_request(self, inputs: Mapping[str, np.ndarray]) -> None:
        """ONNX Runtime holds strings as UTF-8 text: BYTES elements must decode."""
        if not self._bytes_inputs:  # called for every request: a model without BYTES inputs has nothing to check
            return
        for name, arr in inputs.items():
            if arr.dtype == object:
                for i, item in enumerate(arr.reshape(-1)):
                    try:
                        item.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise InvalidArgument(f"input '{name}': BYTES element {i} is not valid UTF-8 ({e.reason} at "
                                              f"byte {e.start}); ONNX Runtime string tensors must be UTF-8") from None

    def run(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str]) -> BatchResult:
        if self._session is None:
            raise Internal(f"model '{self.config.name}': backend is closed")
        t0 = time.perf_counter_ns()
        feed = {k: (_to_str(v) if v.dtype == object else v) for k, v in inputs.items()}
        t1 = time.perf_counter_ns()
        try:
            results = self._run_bf16(feed, outputs) if self._bf16 else self._session.run(list(outputs), feed)
        except Exception as e:  # a failed batch: every request in it gets INTERNAL with this text
            raise Internal(f"model '{self.config.name}': ONNX Runtime failed: {e}") from None
        t2 = time.perf_counter_ns()
        out = {}
        for name, value in zip(outputs, results):
            arr = np.asarray(value)
            if arr.dtype.kind == "U":
                arr = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(arr)
            out[name] = arr
        t3 = time.perf_counter_ns()
        return BatchResult(out, compute_input_ns=t1 - t0, compute_infer_ns=t2 - t1, compute_output_ns=t3 - t2)

    def _run_bf16(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list:
        """BF16 travels as uint16 bit patterns (the wire's raw bytes). NumPy has no bfloat16, so ``run`` refuses
        such tensors either way: inputs go in as OrtValues typed BFLOAT16 over the same memory, outputs are
        read back as uint16 from the OrtValue's buffer."""
        ov = self._ort.OrtValue
        values = {n: ov.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(a), _ONNX_BFLOAT16)
                  if n in self._bf16 else ov.ortvalue_from_numpy(a) for n, a in feed.items()}
        results = []
        for v in self._session.run_with_ort_values(list(outputs), values):
            if v.data_type() != "tensor(bfloat16)":
                results.append(v.numpy())
                continue
            shape = tuple(v.shape())
            count = int(np.prod(shape)) if shape else 1
            raw = (ctypes.c_uint16 * count).from_address(v.data_ptr()) if count else ()
            results.append(np.array(raw, dtype=np.uint16).reshape(shape))  # a copy: the OrtValue owns the memory
        return results

    def close(self) -> None:
        self._session = None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (a cpuset in a container, taskset),
    else os.cpu_count(). Sizing ONNX Runtime's pool by cpu_count on a 4-CPU cpuset of a 16-core host would put
    15 spinning threads on 4 cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)
