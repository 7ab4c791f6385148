"""Errors that carry their gRPC status; only protocol/status.py turns them into an RPC status.

The core (repository, batcher, executor, backends) raises these and never imports grpc.
"""
from __future__ import annotations


class TrtServeError(Exception):
    """Base class: ``code`` is a grpc.StatusCode name."""

    code = "INTERNAL"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidArgument(TrtServeError):
    code = "INVALID_ARGUMENT"


class NotFound(TrtServeError):
    code = "NOT_FOUND"


class Unavailable(TrtServeError):
    code = "UNAVAILABLE"


class DeadlineExceeded(TrtServeError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(TrtServeError):
    code = "CANCELLED"


class Unimplemented(TrtServeError):
    code = "UNIMPLEMENTED"


class AlreadyExists(TrtServeError):
    code = "ALREADY_EXISTS"


class Internal(TrtServeError):
    code = "INTERNAL"


class ModelLoadError(TrtServeError):
    """A model (engine, ONNX file, config) failed validation at load time; the message names the tensor."""

    code = "INVALID_ARGUMENT"
