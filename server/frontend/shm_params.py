"""The three shared-memory parameters of one input or output tensor, parsed before anything is read.

The only parser of them: the front end parses, the engine gets the result (a ``ShmRef``, the engine's own
type, as region, offset and byte size in the descriptor). ``shared_memory_offset`` or
``shared_memory_byte_size`` without ``shared_memory_region`` is an error (``check_no_orphans``), and a region
name that is not a string is named as such ("must be a string (region name), got int64_param").
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from trtserve.server.engine.shm.request import ShmRef
from trtserve.server.errors import InvalidArgument

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"


def _which(p: Any) -> str:
    which = p.WhichOneof("parameter_choice")
    return which if which else "no value"


def _int_param(p: Any, key: str, what: str) -> int:
    which = p.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{what}: parameter '{key}' must be an integer (int64 or uint64), got {_which(p)}")
    value = int(getattr(p, which))
    if value < 0:
        raise InvalidArgument(f"{what}: parameter '{key}' must be >= 0, got {value}")
    return value


def check_no_orphans(parameters: Mapping[str, Any], what: str) -> None:
    """InvalidArgument when the offset or byte size is given without a region (they would be ignored)."""
    if REGION not in parameters:
        for key in (OFFSET, BYTE_SIZE):
            if key in parameters:
                raise InvalidArgument(f"{what}: parameter '{key}' without '{REGION}'; name the shared memory "
                                      f"region, or send the data in the request and leave '{key}' out")


def parse_shm_ref(parameters: Mapping[str, Any], what: str) -> Optional[ShmRef]:
    """The tensor's shared-memory parameters, or None when it names no region.

    ``parameters`` is the tensor's ``map<string, InferParameter>``; ``what`` names the tensor in the
    messages ("input 'INPUT0'"). InvalidArgument when: offset or byte size is given without a region;
    the region is not a non-empty string; the byte size is missing; offset or byte size is not a
    non-negative integer.
    """
    check_no_orphans(parameters, what)
    if REGION not in parameters:
        return None
    p = parameters[REGION]
    if p.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(f"{what}: parameter '{REGION}' must be a string (region name), got {_which(p)}")
    if not p.string_param:
        raise InvalidArgument(f"{what}: parameter '{REGION}' must be a non-empty string (region name), got ''")
    if BYTE_SIZE not in parameters:
        raise InvalidArgument(f"{what}: parameter '{BYTE_SIZE}' is required with '{REGION}'")
    offset = _int_param(parameters[OFFSET], OFFSET, what) if OFFSET in parameters else 0
    return ShmRef(p.string_param, offset, _int_param(parameters[BYTE_SIZE], BYTE_SIZE, what))


__all__ = ["REGION", "OFFSET", "BYTE_SIZE", "ShmRef", "check_no_orphans", "parse_shm_ref"]
