"""The Python gRPC ceiling: a bare grpc.aio ModelInfer server that decodes each request and returns a
precomputed response, with just enough metadata RPCs for perf_analyzer and trtserve bench.

``python -m bench.ceiling_server --port 0 --model m --inputs 64 --outputs 16`` prints its port. Nothing
can serve the same protocol from Python faster than this, so trtserve is measured against it. ``--event-loop
uvloop`` runs it on uvloop, the loop trtserve's processes take where it is installed: the ceiling of that loop.
``--registered inference`` registers only ModelInfer and ModelStreamInfer as grpc registered methods (the others
are served through the generic handler), as trtserve does; the default registers every method, as the generated
``add_GRPCInferenceServiceServicer_to_server`` does, and is the ceiling the goals are read against.
"""
from __future__ import annotations

import argparse

import grpc
import numpy as np

from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.protos import model_config_pb2 as mc
from trtserve.server.frontend.registration import hot_handlers
from trtserve.server.process import loops


class CeilingService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: str, n_in: int, n_out: int) -> None:
        t = pb.ModelMetadataResponse.TensorMetadata
        self.metadata = pb.ModelMetadataResponse(name=model, versions=["1"], platform="onnxruntime_onnx",
                                                 inputs=[t(name="INPUT0", datatype="FP32", shape=[-1, n_in])],
                                                 outputs=[t(name="OUTPUT0", datatype="FP32", shape=[-1, n_out])])
        cfg = mc.ModelConfig(name=model, platform="onnxruntime_onnx", max_batch_size=128)
        cfg.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[n_in])
        cfg.output.add(name="OUTPUT0", data_type=mc.TYPE_FP32, dims=[n_out])
        self.config = pb.ModelConfigResponse(config=cfg)
        self.n_out = n_out
        self.responses = {}

    def _response(self, rows: int) -> pb.ModelInferResponse:
        if rows not in self.responses:
            r = pb.ModelInferResponse(model_name=self.metadata.name, model_version="1")
            r.outputs.add(name="OUTPUT0", datatype="FP32", shape=[rows, self.n_out])
            r.raw_output_contents.append(np.zeros((rows, self.n_out), np.float32).tobytes())
            self.responses[rows] = r
        return self.responses[rows]

    async def ModelInfer(self, request, context):
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        response = self._response(rows)
        if request.id:
            response = pb.ModelInferResponse()
            response.CopyFrom(self._response(rows))
            response.id = request.id
        return response

    async def ModelMetadata(self, request, context):
        return self.metadata

    async def ModelConfig(self, request, context):
        return self.config

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="ceiling", version="0", extensions=[])


class _InferenceRegistered:
    """The server as the generated registration sees it, registering only the inference methods."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(service, hot_handlers(handlers))


async def serve(port: int, model: str, n_in: int, n_out: int, registered: str = "all") -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    target = server if registered == "all" else _InferenceRegistered(server)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(CeilingService(model, n_in, n_out), target)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"ceiling serving on 127.0.0.1:{bound} ", flush=True)
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="m")
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--outputs", type=int, default=16)
    p.add_argument("--event-loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--registered", choices=["all", "inference"], default="all",
                   help="grpc registered methods: every method (the generated code's way) or the inference ones")
    a = p.parse_args()
    loops.run(lambda: serve(a.port, a.model, a.inputs, a.outputs, a.registered), a.event_loop)


if __name__ == "__main__":
    main()
