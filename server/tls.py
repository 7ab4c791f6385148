"""The one TLS server context behind the HTTP port, /metrics and the command line's up-front check of the
certificate files: the same protocol floor and the same key handling everywhere."""
from __future__ import annotations

import os
import ssl
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def server_context(cert: PathLike, key: PathLike, client_ca: Optional[PathLike] = None) -> ssl.SSLContext:
    """TLS 1.2 or later with ``cert`` and its ``key``; with ``client_ca``, clients must present a certificate it
    signed. A password-protected key raises ssl.SSLError instead of prompting on the terminal (the server has
    nobody to ask, and gRPC cannot use such a key either)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.fspath(cert), os.fspath(key), password=lambda: b"")
    if client_ca is not None:
        context.load_verify_locations(os.fspath(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
