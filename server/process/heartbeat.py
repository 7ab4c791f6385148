"""Heartbeats from each child's event loop to the supervisor, so that a child that is alive but stuck is found.

A front end whose event loop no longer runs (a deadlock, a native call that never returns, a thread that holds
the GIL) still holds its share of the port: SO_REUSEPORT keeps giving it new connections, whose calls then wait
for their deadlines. Its process does not exit, so the supervisor's exit watch never sees it. Each child therefore
writes a byte to the pipe it reported ready on, from its event loop, every ``interval`` seconds; the supervisor
kills a child silent for longer than ``--watchdog-seconds``, which its exit watch then handles as any death
(a front end is started again; the engine stops the server with exit code 1).
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable, Optional


def beat_interval(watchdog_seconds: float) -> float:
    """How often a child beats: a few beats fit in the watchdog's window, and at most one a second."""
    return min(1.0, watchdog_seconds / 4)


class Heartbeat:
    """Child side: a byte to ``fd`` every ``interval`` seconds, written by the running loop."""

    def __init__(self, fd: int, interval: float) -> None:
        self._fd = fd
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._handle: Optional[asyncio.TimerHandle] = None
        os.set_blocking(fd, False)  # a supervisor that reads late must not stall this loop

    def start(self) -> None:
        self._beat()

    def _beat(self) -> None:
        try:
            os.write(self._fd, b".")
        except BlockingIOError:  # the pipe is full: the supervisor has beats to read already
            pass
        except OSError:  # the supervisor is gone (this process dies with it): nobody to tell
            os.close(self._fd)
            return
        self._handle = self._loop.call_later(self._interval, self._beat)


class BeatReader(asyncio.Protocol):
    """Supervisor side: calls ``on_beat`` with the time of each read from a child's heartbeat pipe."""

    def __init__(self, on_beat: Callable[[float], None]) -> None:
        self._on_beat = on_beat

    def data_received(self, data: bytes) -> None:
        self._on_beat(time.monotonic())

    def connection_lost(self, exc: Optional[Exception]) -> None:  # the child exited: its exit watch acts
        pass


async def read_beats(pipe: Any, on_beat: Callable[[float], None]) -> asyncio.BaseTransport:
    """Starts reading ``pipe`` (a child's stdout, after its ready line); the transport closes at the child's exit."""
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: BeatReader(on_beat), pipe)
    return transport
