"""Measures the load generator's own ceiling against a trivial server that does no work.

``python -m trtserve.client.bench.ceiling [--concurrency 1,8,32,128,512] [--duration 3] [--servers 2]``
starts ``--servers`` processes answering ModelInfer with one precomputed ModelInferResponse (sharing
one port through SO_REUSEPORT), sweeps the closed loop against them and prints requests/s. Any
number a real benchmark reports near this ceiling measures the generator, not the server; on a
machine with few cores the trivial servers and the generator share them, so it is a lower bound.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
from typing import Awaitable, Callable, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from trtserve.client._channel import INFLIGHT_PER_CHANNEL
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import model_config_pb2 as mc

__all__ = ["TRIVIAL_MODEL", "main", "start_trivial_server", "trivial_server_processes"]

TRIVIAL_MODEL = "trivial"
SERVICE = "inference.GRPCInferenceService"


def _metadata() -> pb.ModelMetadataResponse:
    t = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(name=TRIVIAL_MODEL, versions=["1"], platform="trivial",
                                    inputs=[t(name="INPUT0", datatype="FP32", shape=[-1, 64])],
                                    outputs=[t(name="OUTPUT0", datatype="FP32", shape=[-1, 16])])


def _config() -> mc.ModelConfig:
    return mc.ModelConfig(name=TRIVIAL_MODEL, platform="trivial", max_batch_size=32,
                          input=[mc.ModelInput(name="INPUT0", data_type=mc.TYPE_FP32, dims=[64])],
                          output=[mc.ModelOutput(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[16])])


def _response(batch: int = 1) -> bytes:
    """A ModelInferResponse as the real server would send for the mlp example, serialized once."""
    out = np.zeros((batch, 16), np.float32)
    response = pb.ModelInferResponse(model_name=TRIVIAL_MODEL, model_version="1")
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=list(out.shape))
    response.raw_output_contents.append(out.tobytes())
    return response.SerializeToString()


def _handlers(response: bytes) -> grpc.GenericRpcHandler:
    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    async def metadata(request: pb.ModelMetadataRequest,
                       context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        if request.name != TRIVIAL_MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model: '{request.name}'")
        return _metadata()

    async def config(request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        if request.name != TRIVIAL_MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model: '{request.name}'")
        return pb.ModelConfigResponse(config=_config())

    async def live(request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ready(request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def server_metadata(request: pb.ServerMetadataRequest,
                              context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="trivial", version="0")  # no "statistics": perf_analyzer skips them

    def unary(fn: Callable[..., Awaitable[object]], req_type: type) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req_type.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(SERVICE, {
        # bytes in, bytes out: the trivial server does not even parse the request
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ModelMetadata": unary(metadata, pb.ModelMetadataRequest),
        "ModelConfig": unary(config, pb.ModelConfigRequest),
        "ServerLive": unary(live, pb.ServerLiveRequest),
        "ServerReady": unary(ready, pb.ServerReadyRequest),
        "ServerMetadata": unary(server_metadata, pb.ServerMetadataRequest),
    })


async def start_trivial_server(port: int = 0, host: str = "127.0.0.1",
                               credentials: Optional[grpc.ServerCredentials] = None) -> Tuple[grpc.aio.Server, int]:
    """A started grpc.aio server answering the trivial model; returns (server, bound port)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((_handlers(_response()),))
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    return server, bound


async def _serve_until_closed(conn, port: int) -> None:
    server, bound = await start_trivial_server(port)
    conn.send(bound)
    closed = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), closed.set)  # readable = the parent wrote or closed the pipe
    await closed.wait()
    loop.remove_reader(conn.fileno())
    await server.stop(0)


def _server_process(conn, port: int) -> None:
    asyncio.run(_serve_until_closed(conn, port))


class trivial_server_processes:
    """Context manager: ``n`` trivial-server processes on one port; yields the port."""

    def __init__(self, n: int = 1) -> None:
        self._n = max(1, n)
        self._procs: List[Tuple[mp.process.BaseProcess, object]] = []

    def __enter__(self) -> int:
        ctx = mp.get_context("spawn")  # grpc does not survive fork
        port = 0
        for _ in range(self._n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_server_process, args=(child, port), daemon=True)
            proc.start()
            child.close()
            if not parent.poll(30):
                raise RuntimeError("trivial server did not start within 30 s")
            port = parent.recv()
            self._procs.append((proc, parent))
        return port

    def __exit__(self, *exc: object) -> None:
        for proc, conn in self._procs:
            conn.close()
        for proc, _ in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()


async def _serve_forever(port: int) -> None:
    server, bound = await start_trivial_server(port)
    print(f"trivial server on 127.0.0.1:{bound} (model '{TRIVIAL_MODEL}'); Ctrl-C stops it", flush=True)
    await server.wait_for_termination()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the sweep and prints the generator's ceiling in requests/s."""
    from trtserve.client.bench.report import format_table
    from trtserve.client.bench.runner import BenchConfig, Progress, run

    p = argparse.ArgumentParser(prog="python -m trtserve.client.bench.ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,8,32,128,512", help="levels, comma-separated")
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per level")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    p.add_argument("--servers", type=int, default=2, help="trivial server processes sharing the port")
    p.add_argument("--inflight-per-channel", type=int, default=INFLIGHT_PER_CHANNEL)
    p.add_argument("--engine", default="auto", choices=["auto", "asyncio", "threads"])
    p.add_argument("--transport", default="auto", choices=["auto", "h2", "grpcio"])
    p.add_argument("--processes", type=int, default=1, help="generator processes")
    p.add_argument("--serve", type=int, metavar="PORT",
                   help="only run one trivial server on PORT (0: any) until stopped, e.g. for perf_analyzer")
    args = p.parse_args(argv)
    if args.serve is not None:
        try:
            asyncio.run(_serve_forever(args.serve))
        except KeyboardInterrupt:
            pass
        return 0
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    with trivial_server_processes(args.servers) as port:
        config = BenchConfig(url=f"127.0.0.1:{port}", model=TRIVIAL_MODEL, concurrency=levels,
                             duration_s=args.duration, warmup_s=args.warmup,
                             inflight_per_channel=args.inflight_per_channel, engine=args.engine,
                             transport=args.transport, processes=args.processes)
        result = asyncio.run(run(config, Progress()))
    print(format_table(result))
    best = max(result.levels, key=lambda s: s.requests_per_s)
    print(f"load generator ceiling: {best.requests_per_s:.0f} requests/s (concurrency {int(best.level)}, "
          f"p50 {best.p50_ms:.3f} ms; engine {args.engine}, transport {result.transport}, "
          f"x{args.processes} process(es); "
          f"{args.servers} trivial server process(es), same machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
