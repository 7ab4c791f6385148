"""Turns a URL (one address, several, or a ``dns:///`` name) into a gRPC target, options and credentials.

Kept apart from the clients so both build identical channels and the parsing is unit-tested
without a network. Several addresses become one channel with gRPC's ``round_robin`` policy: it
spreads calls over every READY backend and stops picking one whose connection has failed, so a
stopped server costs no request that had not reached it.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import grpc

__all__ = ["INFLIGHT_PER_CHANNEL", "INT32_MAX", "ChannelSpec", "KeepAliveOptions", "TlsOptions", "channel_options",
           "credentials", "make_spec", "parse_target", "resolve_addresses"]

INT32_MAX = 2**31 - 1
# The load tester's connections: one per six requests in flight, as perf_analyzer's gRPC client shares one among six
# contexts. A server that spreads connections over processes (SO_REUSEPORT, trtserve's --frontends N) is spread over
# them only when the load opens several, and the two tools then load a server through the same number of connections.
INFLIGHT_PER_CHANNEL = 6
SERVICE = "inference.GRPCInferenceService"
Url = Union[str, Sequence[str]]
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


@dataclass(frozen=True)
class KeepAliveOptions:
    """HTTP/2 keepalive pings. Off by default (as tritonclient): servers answer faster pings with GOAWAY."""

    time_ms: int = INT32_MAX
    timeout_ms: int = 20_000
    permit_without_calls: bool = False
    max_pings_without_data: int = 2


@dataclass(frozen=True)
class TlsOptions:
    """PEM bytes or file paths; any of them turns TLS on. ``server_name`` overrides the name checked in the cert."""

    root_cert: Optional[Union[bytes, str]] = None
    client_cert: Optional[Union[bytes, str]] = None
    client_key: Optional[Union[bytes, str]] = None
    server_name: Optional[str] = None


def _split_host_port(address: str) -> Tuple[str, int]:
    address = address.strip()
    if address.startswith("["):  # [::1]:8001
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    return host, int(port)


def _parts(url: Url) -> List[str]:
    """The addresses in ``url``; a gRPC scheme target (``ipv4:a,b``) stays whole."""
    if isinstance(url, str):
        if url.strip().startswith(_SCHEMES):
            return [url.strip()]
        url = url.split(",")
    return [p.strip() for p in url if p.strip()]


def parse_target(url: Url) -> Tuple[str, bool]:
    """(gRPC target, round_robin?) for ``url``; pure, hostnames in a list are left for resolve_addresses.

    - ``"host:8001"`` -> one address, pick_first (gRPC's default);
    - ``"h1:8001,h2:8001"`` or a list -> ``ipv4:``/``ipv6:`` list target with round_robin when every
      host is an IP literal (otherwise a ValueError naming the host, see resolve_addresses);
    - ``"dns:///name:8001"`` -> passed through with round_robin over everything the name resolves to;
    - any other ``scheme:`` target (``unix:``, ``ipv4:``) -> passed through as is.
    """
    parts = _parts(url)
    if not parts:
        raise ValueError("no server address given")
    if len(parts) == 1:
        only = parts[0]
        if only.startswith("dns:"):
            return only, True
        if only.startswith(("ipv4:", "ipv6:")):
            return only, "," in only
        if only.startswith(_SCHEMES):
            return only, False
        _split_host_port(only)
        return only, False
    hosts = [_split_host_port(p) for p in parts]
    versions = set()
    for host, _ in hosts:
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(f"address list {parts}: {host!r} is not an IP address; resolve it first "
                             f"(resolve_addresses) or use dns:///{host}:PORT") from None
    if len(versions) > 1:
        raise ValueError(f"address list {parts} mixes IPv4 and IPv6; gRPC takes one family per target")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts), True
    return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts), True


def resolve_addresses(url: Url) -> List[str]:
    """Replaces hostnames in a several-address URL by their first IPv4 address (resolved once, now)."""
    parts = _parts(url)
    if len(parts) < 2:
        return parts
    out = []
    for part in parts:
        host, port = _split_host_port(part)
        try:
            ipaddress.ip_address(host)
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        except ValueError:
            info = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
            out.append(f"{info[0][4][0]}:{port}")
    return out


def service_config(round_robin: bool, retries: int) -> str:
    """JSON service config: load balancing (with health checks) and the UNAVAILABLE-only retry policy.

    gRPC retries a call only until the first response headers arrive, and UNAVAILABLE is what a
    call gets when it never reached a server (refused connection, GOAWAY before the stream was
    accepted), so a retried inference has not run. ``retries`` = extra attempts; 0 disables.
    """
    config: dict = {}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        # client-side health checking (gRFC A17): a draining server turns NOT_SERVING before it stops,
        # and round_robin stops picking it then; servers without grpc.health.v1 count as healthy
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    if retries > 0:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def channel_options(round_robin: bool = False, retries: int = 2, keepalive: Optional[KeepAliveOptions] = None,
                    tls: Optional[TlsOptions] = None,
                    extra: Sequence[Tuple[str, object]] = ()) -> List[Tuple[str, object]]:
    """Options shared by both clients: INT32_MAX messages, keepalive, retry/LB service config, then ``extra``."""
    ka = keepalive or KeepAliveOptions()
    options: List[Tuple[str, object]] = [
        ("grpc.max_send_message_length", INT32_MAX),
        ("grpc.max_receive_message_length", INT32_MAX),
        ("grpc.keepalive_time_ms", ka.time_ms),
        ("grpc.keepalive_timeout_ms", ka.timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(ka.permit_without_calls)),
        ("grpc.http2.max_pings_without_data", ka.max_pings_without_data),
        ("grpc.enable_retries", 1 if retries > 0 else 0),
        ("grpc.service_config", service_config(round_robin, retries)),
    ]
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    names = {k for k, _ in extra}
    return [o for o in options if o[0] not in names] + list(extra)


def _pem(value: Optional[Union[bytes, str]]) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def credentials(tls: Optional[TlsOptions]) -> Optional[grpc.ChannelCredentials]:
    """SSL channel credentials for ``tls`` (None: plaintext). Reads PEM files once, here."""
    if tls is None:
        return None
    if (tls.client_cert is None) != (tls.client_key is None):
        raise ValueError("client_cert and client_key go together (mutual TLS needs both)")
    return grpc.ssl_channel_credentials(root_certificates=_pem(tls.root_cert), private_key=_pem(tls.client_key),
                                        certificate_chain=_pem(tls.client_cert))


@dataclass(frozen=True)
class ChannelSpec:
    """Everything a client needs to open its channel; built once by ``make_spec`` for both clients."""

    target: str
    options: Tuple[Tuple[str, object], ...]
    credentials: Optional[grpc.ChannelCredentials]
    metadata: Tuple[Tuple[str, str], ...]


def make_spec(url: Url, tls: Union[bool, TlsOptions, None] = None, root_cert: Optional[Union[bytes, str]] = None,
              client_cert: Optional[Union[bytes, str]] = None, client_key: Optional[Union[bytes, str]] = None,
              server_name: Optional[str] = None, keepalive: Optional[KeepAliveOptions] = None, retries: int = 2,
              headers: Optional[Mapping[str, str]] = None,
              channel_args: Sequence[Tuple[str, object]] = ()) -> ChannelSpec:
    """Validates the client's constructor arguments; ValueError names the one that is wrong."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    target, round_robin = parse_target(resolve_addresses(url))
    if isinstance(tls, TlsOptions):
        tls_opts: Optional[TlsOptions] = tls
    elif tls or any(v is not None for v in (root_cert, client_cert, client_key, server_name)):
        tls_opts = TlsOptions(root_cert, client_cert, client_key, server_name)
    else:
        tls_opts = None
    options = channel_options(round_robin, retries, keepalive, tls_opts, channel_args)
    return ChannelSpec(target, tuple(options), credentials(tls_opts), metadata(headers))


def metadata(headers: Optional[Mapping[str, str]]) -> Tuple[Tuple[str, str], ...]:
    """gRPC metadata from a header dict (keys lower-cased, as HTTP/2 requires)."""
    return tuple((k.lower(), str(v)) for k, v in (headers or {}).items())
