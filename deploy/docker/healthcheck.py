#!/usr/bin/env python3
"""Container health check through the standard gRPC health service.

Calls ``grpc.health.v1.Health/Check`` on the local trtserve and exits 0 when the answer is
SERVING, 1 otherwise (Docker's HEALTHCHECK contract). It needs only grpcio and
grpcio-health-checking, which trtserve already depends on, so the image carries no extra
probe binary. Settings come from the same environment variables as the entrypoint:
TRTSERVE_GRPC_PORT and TRTSERVE_HOST, plus TRTSERVE_HEALTH_SERVICE (default "", the whole
server) and TRTSERVE_HEALTH_TIMEOUT (seconds, default 3); flags override them.
"""
import argparse
import os
import sys
from typing import List, Optional

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def default_target() -> str:
    """The address to probe: the server's bind host (loopback for a wildcard) and gRPC port."""
    host = os.environ.get("TRTSERVE_HOST", "")
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = "[%s]" % host
    return "%s:%s" % (host, os.environ.get("TRTSERVE_GRPC_PORT", "8001"))


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """Command-line flags, defaulting to the environment."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=default_target(), help="host:port of the gRPC server")
    parser.add_argument("--service", default=os.environ.get("TRTSERVE_HEALTH_SERVICE", ""),
                        help='health service name to ask about ("" = whole server)')
    raw = os.environ.get("TRTSERVE_HEALTH_TIMEOUT", "3")
    try:
        timeout = float(raw)
    except ValueError:
        parser.exit(2, "healthcheck: TRTSERVE_HEALTH_TIMEOUT=%r is not a number\n" % raw)
    parser.add_argument("--timeout", type=float, default=timeout, help="RPC deadline in seconds")
    return parser.parse_args(argv)


def check(target: str, service: str, timeout: float) -> int:
    """Ask the health service once; print the status and return the exit code."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:  # UNAVAILABLE while starting/stopped, NOT_FOUND for an unknown service
            print("unhealthy: %s %s: %s" % (target, err.code().name, err.details()), file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print("unhealthy: %s service=%r status=%s" % (target, service, name), file=sys.stderr)
        return 1
    print("healthy: %s service=%r status=%s" % (target, service, name))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    return check(args.target, args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
