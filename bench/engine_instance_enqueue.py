"""The engine process as it ran TensorRT batches before the engine's loop enqueued them: each batch packed and
enqueued on its instance's thread (as the single-process server still does). ``bench.gpu_engine --enqueue-on
loop,instance`` starts it in place of ``trtserve.server.engine.process`` to measure both in one run."""
from __future__ import annotations

from trtserve.server.engine.batcher import scheduler
from trtserve.server.engine import process

_init = scheduler.DynamicBatcher.__init__


def _instance_enqueue(self: scheduler.DynamicBatcher, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    _init(self, *args, **kwargs)
    self._loop_enqueue = False


if __name__ == "__main__":
    scheduler.DynamicBatcher.__init__ = _instance_enqueue  # type: ignore[method-assign]
    raise SystemExit(process.main())
