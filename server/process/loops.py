"""Which asyncio event loop a server process runs: ``--event-loop`` auto (uvloop where it is installed), uvloop or
asyncio. A front end spends most of its time in event-loop and gRPC machinery, not in trtserve's own code, and uvloop
runs the event loop's part in C (docs/architecture.md gives the measurement)."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Optional, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


class LoopError(ValueError):
    """An unknown loop, or uvloop asked for where it is not installed."""


def _uvloop() -> Optional[Any]:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def resolve(choice: str) -> str:
    """The loop ``choice`` names here: "uvloop" or "asyncio". LoopError when uvloop is asked for and missing."""
    if choice not in CHOICES:
        raise LoopError(f"unknown event loop {choice!r}; one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    if _uvloop() is None:
        if choice == "uvloop":
            raise LoopError("uvloop is not installed (pip install uvloop)")
        return "asyncio"
    return "uvloop"


def run(main: Callable[[], Awaitable[T]], choice: str) -> T:
    """``asyncio.run(main())`` on the loop ``choice`` resolves to (uvloop.run keeps asyncio.run's contract: a new
    loop, async generators and the default executor shut down at the end)."""
    if resolve(choice) == "uvloop":
        uvloop = _uvloop()
        assert uvloop is not None
        return uvloop.run(main())
    return asyncio.run(main())  # type: ignore[arg-type]


__all__ = ["CHOICES", "LoopError", "resolve", "run"]
