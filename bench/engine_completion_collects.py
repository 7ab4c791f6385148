"""The engine process with TensorRT batches collected on the completion thread, as before the loop collected them
(the completion thread waited for the device, then collected and split the batch there). ``bench.gpu_engine
--enqueue-on loop,completion-collects`` starts it in place of ``trtserve.server.engine.process`` to measure both in
one run."""
from __future__ import annotations

from trtserve.server.engine import process
from trtserve.server.engine.backends.tensorrt import TensorRTBackend

if __name__ == "__main__":
    TensorRTBackend.wait = lambda self, instance, ticket: False  # type: ignore[method-assign]
    raise SystemExit(process.main())
