"""Where the generator's own HTTP/2 client connects: one address, TLS, headers (shared by both drivers).

Only a single HOST:PORT qualifies: several addresses and ``dns:///`` need grpcio's resolver and
balancer, so those runs stay on the grpcio transport.
"""
from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple, Union

from trtserve.client._channel import _SCHEMES, _pem, parse_target
from trtserve.client.bench.h2conn import H2Connection
from trtserve.client.bench.load import MODEL_INFER

__all__ = ["H2Target", "h2_address", "tls_context", "tls_options"]


def h2_address(url: str) -> Optional[Tuple[str, int]]:
    """(host, port) when ``url`` is one HOST:PORT this engine can dial; None for gRPC-only targets
    (several addresses, ``dns:///``, ``unix:``), which stay on grpcio's resolver and balancer."""
    try:
        target, round_robin = parse_target(url)
    except ValueError:
        return None
    if round_robin or target.startswith(_SCHEMES):
        return None
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def tls_context(root_cert: Optional[Union[bytes, str]] = None, client_cert: Optional[Union[bytes, str]] = None,
                client_key: Optional[Union[bytes, str]] = None) -> ssl.SSLContext:
    """A client TLS context offering only HTTP/2 (ALPN h2), as gRPC requires; the same arguments as
    the clients' TLS options (PEM bytes or file paths; no root cert: the system's)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (mutual TLS needs both)")
    ctx = ssl.create_default_context(cadata=_pem(root_cert).decode("ascii") if root_cert is not None else None)
    if client_cert is not None and client_key is not None:
        if isinstance(client_cert, str) and isinstance(client_key, str):
            ctx.load_cert_chain(client_cert, client_key)
        else:  # ssl loads a chain from files only
            with tempfile.TemporaryDirectory() as tmp:
                paths = []
                for name, value in (("cert.pem", client_cert), ("key.pem", client_key)):
                    path = os.path.join(tmp, name)
                    with open(path, "wb") as f:
                        f.write(_pem(value))
                    paths.append(path)
                ctx.load_cert_chain(paths[0], paths[1])
    ctx.set_alpn_protocols(["h2"])
    return ctx


def tls_options(tls: Optional[Mapping[str, object]]) -> Tuple[Optional[ssl.SSLContext], Optional[str]]:
    """(TLS context or None, server name override) from make_spec's TLS keyword arguments
    (``tls=True``, ``root_cert``, ``client_cert``, ``client_key``, ``server_name``)."""
    options = dict(tls or {})
    server_name = options.pop("server_name", None)
    wants_tls = bool(options.pop("tls", None)) or any(v is not None for v in options.values())
    return (tls_context(**options) if wants_tls else None), server_name  # type: ignore[arg-type]


@dataclass(frozen=True)
class H2Target:
    """One server address with its TLS context and the headers every call carries."""

    host: str
    port: int
    ssl: Optional[ssl.SSLContext] = None
    server_name: Optional[str] = None  # TLS name check and :authority override
    metadata: Tuple[Tuple[str, str], ...] = ()

    @classmethod
    def from_url(cls, url: str, metadata: Sequence[Tuple[str, str]] = (),
                 tls: Optional[Mapping[str, object]] = None) -> "H2Target":
        """ValueError when ``url`` is not one HOST:PORT (see h2_address)."""
        address = h2_address(url)
        if address is None:
            raise ValueError(f"the h2 transport dials one HOST:PORT, not {url!r}")
        context, server_name = tls_options(tls)
        return cls(address[0], address[1], context, server_name, tuple(metadata))

    @property
    def authority(self) -> str:
        if self.server_name:
            return self.server_name
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def server_hostname(self) -> Optional[str]:
        """The name TLS checks the certificate against (None without TLS)."""
        return (self.server_name or self.host) if self.ssl is not None else None

    def new_state(self) -> H2Connection:
        """A fresh connection state for ModelInfer calls to this target."""
        return H2Connection(self.authority, MODEL_INFER, "https" if self.ssl is not None else "http", self.metadata)
