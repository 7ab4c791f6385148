"""``python -m trtserve.server.engine.process``: the engine process, started by the supervisor.

It owns the model repository, the batchers, the backends (TensorRT, CUDA and CuPy live only here),
client shared-memory regions, statistics and /metrics, and serves front ends on a Unix socket.
"""
from __future__ import annotations

import logging

from trtserve.server.engine.host import EngineHost, StartupFailure
from trtserve.server.process import child, loops

log = logging.getLogger("trtserve.engine")


async def _run(payload: dict) -> int:
    stop = child.stop_event()
    host = EngineHost(payload["options"])
    host.repository.inline_batches = True  # this process's loop serves only the engine
    try:
        await host.start()
    except StartupFailure as e:  # the supervisor prints the one line and exits with the code
        child.report_ready({"error": str(e), "code": e.code})
        return e.code
    host.listen(payload["address"])
    child.settle_heap()
    child.report_ready({"metrics_port": host.metrics_port}, payload.get("beat_interval"))
    await stop.wait()
    log.info("engine stopping: unloading models")
    await host.stop()
    return 0


def main() -> int:
    payload = child.boot()
    return loops.run(lambda: _run(payload), payload["options"].event_loop)


if __name__ == "__main__":
    raise SystemExit(main())
