"""One HTTP server library in front of trtserve's REST API, for bench/http.py's choice of library
(``python -m bench.http_candidate --library aiohttp|uvicorn --repo R --grpc-port G --http-port H``).

The same single-process server (TrtServer, ``--frontends 0``, its own HTTP port off) and the same
``HttpApi`` serve every request; only the library that parses HTTP and calls the API differs: aiohttp (as
trtserve ships it, server/frontend/http/server.py) or uvicorn with httptools through a minimal ASGI app.
Prints "... on 127.0.0.1:<grpc port> ..." when ready and serves until SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal

from trtserve.server.app import ServerOptions, TrtServer
from trtserve.server.frontend.http.api import HttpApi


def asgi_app(api: HttpApi):
    """The REST API as a bare ASGI app (no framework): body in, api.handle, reply out."""
    from multidict import CIMultiDict

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
        reply = await api.handle(scope["method"], scope["path"], headers, bytes(body))
        out = [(b"content-type", reply.content_type.encode())] if reply.content_type else []
        out += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": reply.body})

    return app


async def _run(a: argparse.Namespace) -> None:
    options = ServerOptions(model_repository=a.repo, grpc_port=a.grpc_port, metrics_port=None, gpu_metrics=False,
                            http_port=a.http_port if a.library == "aiohttp" else None)
    server = TrtServer(options)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    uv = None
    if a.library == "uvicorn":
        import uvicorn

        config = uvicorn.Config(asgi_app(HttpApi(server.service)), host="127.0.0.1", port=a.http_port,
                                http="httptools", lifespan="off", access_log=False, log_level="warning")
        uv = uvicorn.Server(config)
        uv.install_signal_handlers = lambda: None  # older uvicorn; newer ones only capture inside serve()
        task = loop.create_task(uv.serve())
        while not uv.started:
            await asyncio.sleep(0.05)
    print(f"{a.library} candidate on 127.0.0.1:{server.grpc_port} (http {a.http_port})", flush=True)
    await stop.wait()
    if uv is not None:
        uv.should_exit = True
        await task
    await server.stop(1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", choices=["aiohttp", "uvicorn"], required=True)
    p.add_argument("--repo", type=pathlib.Path, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    asyncio.run(_run(p.parse_args()))


if __name__ == "__main__":
    main()
