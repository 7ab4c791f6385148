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


# The two names a probe can ask for. "" (the whole server) is readiness: SERVING only while the server takes
# work and every model that should be loaded is READY (strict readiness), what load balancers, Docker's
# HEALTHCHECK and Kubernetes' readiness and startup probes want. The service's own name is liveness: SERVING while
# this process serves and its engine is alive, so a Kubernetes liveness probe does not restart a pod because a
# model failed to load (restarting would not load it either).
READINESS = ""
LIVENESS = SERVICE


def _status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


async def set_ready(servicer: health.aio.HealthServicer, ready: bool) -> None:
    await servicer.set(READINESS, _status(ready))


async def set_live(servicer: health.aio.HealthServicer, live: bool) -> None:
    await servicer.set(LIVENESS, _status(live))


def add_reflection(server: grpc.aio.Server) -> None:
    """Reflection over trtserve's own descriptor pool (which also gets the health service's file)."""
    try:
        _pool.POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        _pool.POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=_pool.POOL)
