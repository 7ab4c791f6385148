"""grpc.health.v1 and server reflection, registered beside the inference service."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from trtserve.protos import _pool
from trtserve.protos import grpc_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """Adds the health service; status SERVING/NOT_SERVING is set by the app as it starts and drains."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await servicer.set(name, status)


def add_reflection(server: grpc.aio.Server) -> None:
    """Reflection over trtserve's own descriptor pool (which also gets the health service's file)."""
    try:
        _pool.POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        _pool.POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=_pool.POOL)
