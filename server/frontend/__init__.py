"""gRPC edge: the KServe v2 / Triton service, request decoding, status mapping, health."""
