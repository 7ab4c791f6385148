"""Errors that carry their gRPC status; only frontend/status.py turns them into an RPC status.

The core (repository, batcher, executor, backends) raises these and never imports grpc.
"""
from __future__ import annotations


class TrtServeError(Exception):
    """Base class: ``code`` is a grpc.StatusCode name; ``reason`` is the failure reason reported to
    the observers (statistics and the ``reason`` label of nv_inference_request_failure)."""

    code = "INTERNAL"
    reason = "backend"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidArgument(TrtServeError):
    code = "INVALID_ARGUMENT"
    reason = "invalid"


class NotFound(TrtServeError):
    code = "NOT_FOUND"
    reason = "invalid"


class Unavailable(TrtServeError):
    code = "UNAVAILABLE"
    reason = "unavailable"


class DeadlineExceeded(TrtServeError):
    code = "DEADLINE_EXCEEDED"
    reason = "timeout"


class Cancelled(TrtServeError):
    code = "CANCELLED"
    reason = "cancelled"


class Unimplemented(TrtServeError):
    code = "UNIMPLEMENTED"
    reason = "invalid"


class AlreadyExists(TrtServeError):
    code = "ALREADY_EXISTS"
    reason = "invalid"


class QueueFull(Unavailable):
    """The priority level's queue is at max_queue_size (Triton answers UNAVAILABLE too)."""

    reason = "rejected"


class QueueTimeout(Unavailable):
    """The queue policy's timeout expired with timeout_action REJECT."""

    reason = "timeout"


class Internal(TrtServeError):
    code = "INTERNAL"


class ModelLoadError(TrtServeError):
    """A model (engine, ONNX file, config) failed validation at load time; the message names the tensor."""

    code = "INVALID_ARGUMENT"


class ResourceExhausted(TrtServeError):
    """A per-server limit is reached (e.g. registered shared-memory regions, ``--max-shm-regions``)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "rejected"


def bind_hint(error: OSError) -> str:
    """What a failed bind most likely means, for the one line the user sees (empty when the errno says nothing
    more than its own text)."""
    import errno  # noqa: PLC0415 - only a failed start gets here

    return {errno.EADDRINUSE: " (another server on this port?)",
            errno.EACCES: " (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: " (no interface of this machine has that address)"}.get(error.errno or 0, "")
