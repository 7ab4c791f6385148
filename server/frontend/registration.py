"""Registers ``inference.GRPCInferenceService`` on a grpc.aio server, tolerating undecodable messages.

With the generated ``add_GRPCInferenceServiceServicer_to_server``, a message that is not a valid
protobuf of the method's request type makes grpc's deserializer raise: a unary call is answered
UNKNOWN with a traceback logged per request, and in ModelStreamInfer the request iterator simply
ends, so the stream closes with OK and the requests sent after the bad one are never answered
(issue 18 item 8). Here the deserializer returns the sentinel ``UNDECODABLE`` instead of raising,
and the wrapped handlers turn it into INVALID_ARGUMENT with one log line (no traceback):

- unary methods abort with INVALID_ARGUMENT "request message could not be decoded as inference.<Type>";
- ModelStreamInfer: the servicer sees the end of its input at the bad message, so it answers the
  requests it already read (their responses are written), then the stream ends with INVALID_ARGUMENT.

The method table comes from the service descriptor in grpc_service.proto, so it always matches the
generated one. A method the servicer does not define is not registered (grpc answers UNIMPLEMENTED).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, AsyncIterator, Callable, Dict, Mapping

import grpc

from trtserve.protos import grpc_service_pb2 as pb

log = logging.getLogger("trtserve.protocol")

SERVICE = "inference.GRPCInferenceService"
# the methods a loaded server gets at a high rate; the others are metadata, control and probes
HOT_METHODS = ("ModelInfer", "ModelStreamInfer")


class _Undecodable:
    """Type of the ``UNDECODABLE`` sentinel."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECODABLE"



UNDECODABLE = _Undecodable()  # what the deserializer returns for bytes that are not a valid message


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    parse = message_class.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, or anything else the parser raises on hostile bytes
            return UNDECODABLE

    return deserialize


def _message(full_type: str) -> str:
    return f"request message could not be decoded as {full_type}"


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return "unknown peer"


def _unary(method_name: str, full_type: str, handler: Callable) -> Callable:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is UNDECODABLE:
            log.warning("%s from %s: %s; answered INVALID_ARGUMENT", method_name, _peer(context), _message(full_type))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(full_type))
        result = handler(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    unary.__name__ = method_name
    return unary


def _stream(method_name: str, full_type: str, handler: Callable) -> Callable:
    async def stream(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        bad = []

        async def requests() -> AsyncIterator[Any]:
            async for request in request_iterator:
                if request is UNDECODABLE:
                    # the servicer sees the end of its input here: it finishes the requests it already has
                    bad.append(True)
                    return
                yield request

        async for response in handler(requests(), context):
            yield response
        if bad:
            log.warning("%s from %s: %s; the stream ends with INVALID_ARGUMENT", method_name, _peer(context),
                        _message(full_type))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                _message(full_type) + "; the requests before it were answered, "
                                "the ones after it were not read")

    stream.__name__ = method_name
    return stream


def method_handlers(servicer: Any) -> Dict[str, grpc.RpcMethodHandler]:
    """{method name: handler} for every method of the service that ``servicer`` defines."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: Dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        impl = getattr(servicer, m.name, None)
        if impl is None:
            continue
        request_class = getattr(pb, m.input_type.name)
        response_class = getattr(pb, m.output_type.name)
        full_type = m.input_type.full_name
        deserialize = _deserializer(request_class)
        serialize = response_class.SerializeToString
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                _stream(m.name, full_type, impl), request_deserializer=deserialize, response_serializer=serialize)
        elif not m.client_streaming and not m.server_streaming:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(m.name, full_type, impl), request_deserializer=deserialize, response_serializer=serialize)
        else:  # the service has none of these today; fail loudly if the proto ever grows one
            raise NotImplementedError(f"{SERVICE}/{m.name}: only unary and bidirectional methods are handled")
    return handlers


def hot_handlers(handlers: Mapping[str, Any]) -> Dict[str, Any]:
    """The inference methods among ``handlers``: the only ones worth registering with grpc (add_inference_service)."""
    return {name: h for name, h in handlers.items() if name in HOT_METHODS}


def add_inference_service(server: grpc.aio.Server, servicer: Any) -> None:
    """Registers the GRPCInferenceService methods of ``servicer`` (grpc.aio signatures:
    ``async def ModelInfer(self, request, context)``, ``async def ModelStreamInfer(self,
    request_iterator, context)`` as an async generator) on ``server``, in place of
    ``add_GRPCInferenceServiceServicer_to_server``; undecodable messages answer INVALID_ARGUMENT."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # The inference methods are registered methods too (grpc >= 1.63): the generic path alone was slower per call
    # (2-core VM, perf_analyzer at concurrency 1, three rounds each: p50 40-50 us higher with one or two front
    # ends). Only they: grpc.aio's accept loop runs an asyncio.wait over one pending call per registered method at
    # every incoming call, so registering all twenty methods makes each inference pay for the other nineteen.
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, hot_handlers(handlers))


__all__ = ["HOT_METHODS", "UNDECODABLE", "SERVICE", "add_inference_service", "hot_handlers", "method_handlers"]
