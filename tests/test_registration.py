"""Issue 18 item 8: a message that is not a valid protobuf answers INVALID_ARGUMENT with one log line.

Against a tiny grpc.aio server with a stub servicer registered through
``registration.add_inference_service`` (not the real service, which does not matter here); the bad
bytes go out through raw channels whose serializer is the identity.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Tuple

import grpc
import pytest

from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.frontend.registration import HOT_METHODS, UNDECODABLE, add_inference_service, method_handlers

GARBAGE = b"\xff" * 10
SERVICE = "/inference.GRPCInferenceService/"
LOGGER = "trtserve.protocol"


class StubServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Echoes ids; records what it was given, so a test can see the sentinel never reaches it."""

    def __init__(self) -> None:
        self.seen: List[object] = []

    async def ServerLive(self, request, context):
        self.seen.append(request)
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request, context):
        self.seen.append(request)
        return pb.ModelInferResponse(model_name=request.model_name, id=request.id)

    async def ModelStreamInfer(self, request_iterator, context):
        """Like the real one: requests run concurrently, responses are written as they complete, and at
        the end of the input the requests in flight are still answered."""
        out: asyncio.Queue = asyncio.Queue()

        async def one(req) -> None:
            await asyncio.sleep(0.01 * (int(req.id) % 3))  # out of order, like real inference
            await out.put(pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=req.id)))

        async def reader() -> None:
            tasks = []
            async for req in request_iterator:
                self.seen.append(req)
                tasks.append(asyncio.ensure_future(one(req)))
            await asyncio.gather(*tasks)
            await out.put(None)

        task = asyncio.ensure_future(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
        finally:
            task.cancel()


def run(test) -> None:
    async def main():
        servicer = StubServicer()
        server = grpc.aio.server()
        add_inference_service(server, servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(test(channel, servicer), 30)
        finally:
            await server.stop(None)

    asyncio.run(main())


def _records(caplog) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("trtserve") or r.levelno >= logging.ERROR]


def test_garbage_is_not_a_message():
    with pytest.raises(Exception):
        pb.ModelInferRequest.FromString(GARBAGE)


def test_unary_garbage_is_invalid_argument_with_one_log_line(caplog):
    caplog.set_level(logging.INFO)

    async def test(channel, servicer):
        raw = channel.unary_unary(SERVICE + "ModelInfer", request_serializer=lambda b: b,
                                  response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await raw(GARBAGE, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "request message could not be decoded as inference.ModelInferRequest"
        assert servicer.seen == []
        # the same connection still serves good requests, through the same raw channel and a stub
        good = await raw(pb.ModelInferRequest(model_name="m", id="7").SerializeToString(), timeout=10)
        assert good.id == "7"
        assert (await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(id="8"))).id == "8"

    run(test)
    records = _records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None and "ModelInfer" in records[0].getMessage()
    assert "could not be decoded as inference.ModelInferRequest" in records[0].getMessage()


def test_every_unary_method_tolerates_garbage(caplog):
    caplog.set_level(logging.INFO)

    async def test(channel, servicer):
        raw = channel.unary_unary(SERVICE + "ServerLive", request_serializer=lambda b: b,
                                  response_deserializer=pb.ServerLiveResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await raw(GARBAGE, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inference.ServerLiveRequest" in e.value.details()
        assert (await raw(b"", timeout=10)).live  # an empty message is a valid ServerLiveRequest
        # a method the stub does not implement still answers UNIMPLEMENTED, garbage or not
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(test)
    assert sum("could not be decoded" in r.getMessage() for r in caplog.records) == 1


async def _stream(channel, messages: List[bytes]) -> Tuple[List[str], grpc.StatusCode, str]:
    call = channel.stream_stream(SERVICE + "ModelStreamInfer", request_serializer=lambda b: b,
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)(timeout=20)
    for m in messages:
        await call.write(m)
    await call.done_writing()
    ids = []
    try:
        async for response in call:
            ids.append(response.infer_response.id)
    except grpc.aio.AioRpcError:
        pass
    return ids, await call.code(), await call.details()


def _good(i: int) -> bytes:
    return pb.ModelInferRequest(model_name="m", id=str(i)).SerializeToString()


def test_stream_with_garbage_ends_with_invalid_argument_after_answering_the_earlier_requests(caplog):
    caplog.set_level(logging.INFO)

    async def test(channel, servicer):
        ids, code, details = await _stream(channel, [_good(i) for i in range(5)] + [GARBAGE] +
                                           [_good(i) for i in range(5, 8)])
        assert sorted(ids) == ["0", "1", "2", "3", "4"]  # every earlier request answered, none after
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "could not be decoded as inference.ModelInferRequest" in details
        assert UNDECODABLE not in servicer.seen and len(servicer.seen) == 5
        # the server goes on: a clean stream on the same channel ends OK with every answer
        ids, code, _ = await _stream(channel, [_good(i) for i in range(8)])
        assert sorted(ids) == [str(i) for i in range(8)] and code == grpc.StatusCode.OK

    run(test)
    records = _records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None and "ModelStreamInfer" in records[0].getMessage()


def test_stream_that_starts_with_garbage(caplog):
    async def test(channel, servicer):
        ids, code, _ = await _stream(channel, [GARBAGE, _good(1)])
        assert ids == [] and code == grpc.StatusCode.INVALID_ARGUMENT and servicer.seen == []

    run(test)


class Recorder:
    """Stands in for a server: keeps what a registration gives it."""

    def __init__(self) -> None:
        self.generic: list = []
        self.registered: Dict[str, set] = {}

    def add_generic_rpc_handlers(self, handlers):
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service, handlers):
        self.registered[service] = set(handlers)


def test_method_table_matches_the_generated_one():
    class Everything:
        def __getattr__(self, name):
            return lambda *a: None

    recorder = Recorder()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Everything(), recorder)
    ours = method_handlers(Everything())
    assert set(ours) == recorder.registered["inference.GRPCInferenceService"]
    assert ours["ModelStreamInfer"].request_streaming and ours["ModelStreamInfer"].response_streaming
    assert not ours["ModelInfer"].request_streaming and not ours["ModelInfer"].response_streaming
    assert ours["ModelInfer"].request_deserializer(GARBAGE) is UNDECODABLE
    assert ours["ModelInfer"].request_deserializer(_good(3)).id == "3"
    assert set(method_handlers(object())) == set()  # nothing defined, nothing registered


def test_only_the_inference_methods_are_registered_methods_and_the_generic_handler_serves_all():
    """grpc.aio waits on one pending call per registered method at every incoming call: the other methods
    go through the generic handler, which must still know every one of them."""
    recorder, servicer = Recorder(), StubServicer()
    add_inference_service(recorder, servicer)
    assert recorder.registered == {"inference.GRPCInferenceService": set(HOT_METHODS)}

    class Details:
        def __init__(self, method: str) -> None:
            self.method, self.invocation_metadata = method, ()

    served = method_handlers(servicer)
    assert {"ServerLive", "ModelInfer", "ModelStreamInfer"} <= set(served)
    for name in served:
        assert recorder.generic[0].service(Details(SERVICE + name)) is not None


def test_a_method_that_is_not_registered_is_served_through_the_generic_handler():
    async def test(channel, servicer):
        live = channel.unary_unary(SERVICE + "ServerLive", request_serializer=pb.ServerLiveRequest.SerializeToString,
                                   response_deserializer=pb.ServerLiveResponse.FromString)
        assert (await live(pb.ServerLiveRequest())).live
        infer = channel.unary_unary(SERVICE + "ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        assert (await infer(pb.ModelInferRequest(model_name="m", id="7"))).id == "7"

    run(test)


def test_a_servicer_without_the_inference_methods_registers_none():
    class OnlyLive:
        async def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

    recorder = Recorder()
    add_inference_service(recorder, OnlyLive())
    assert recorder.registered == {"inference.GRPCInferenceService": set()}
