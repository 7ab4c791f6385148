"""``python -m trtserve.server.frontend.process``: one front-end process (gRPC and HTTP), started by the supervisor.

It creates its arena, connects to the engine (handing it the arena), waits until the engine has attached it
(page-locking the arena first when a TensorRT model is served), binds the shared port with
SO_REUSEPORT and serves until SIGTERM, then drains. If the engine goes away it answers UNAVAILABLE (and
health NOT_SERVING) until the supervisor stops it.
"""
from __future__ import annotations

import logging
import os

from trtserve.server.errors import Unavailable
from trtserve.server.frontend.engine_client import EngineClient
from trtserve.server.frontend.server import FrontEnd
from trtserve.server.ipc import channel
from trtserve.server.ipc.arena import Arena
from trtserve.server.ipc.channel import SocketLink
from trtserve.server.process import child, loops

log = logging.getLogger("trtserve.frontend")


async def _run(payload: dict) -> int:
    stop = child.stop_event()
    options = payload["options"]
    if options.frontend_scheduling == "batch":  # before gRPC starts its threads: they inherit the policy
        child.schedule_as_batch()
    arena = Arena.create(options.arena_bytes, f"trtserve-frontend-{payload['index']}")
    hello = {"name": f"frontend-{payload['index']}", "pid": os.getpid(), "start": payload.get("start_reason", "start")}
    sock = channel.connect(payload["address"], hello, [arena.fd])
    client = EngineClient(SocketLink(sock), arena)
    client.start()
    try:
        await client.attached()  # not before: connections taken meanwhile would wait unread (see attached())
    except Unavailable as e:
        log.error("%s", e)
        return 1
    frontend = FrontEnd(options, client, reuse_port=True)
    port = await frontend.start()
    child.settle_heap()
    child.report_ready({"port": port, "http_port": frontend.http_port}, payload.get("beat_interval"))
    await stop.wait()
    await frontend.stop(options.drain_seconds)
    client.link.close()
    return 0


def main() -> int:
    payload = child.boot()
    return loops.run(lambda: _run(payload), payload["options"].event_loop)


if __name__ == "__main__":
    raise SystemExit(main())
