"""Giving memory back to the OS after a burst of large requests (issue 18 item 10).

After a flood of large requests a process keeps what the burst took: glibc keeps freed heap pages
(grpc's and protobuf's message buffers, NumPy copies) for reuse, and the arena's pages stay resident
in the front end and in the engine once touched. That is fine while bursts repeat and bad for a
host that runs other things, so when a process goes idle after its resident memory grew, it hands
the pages back:

- ``malloc_trim(0)`` (glibc, through ctypes; a no-op elsewhere) returns free heap pages of every
  malloc arena;
- a front end whose requests have all been answered has no arena block in use (a block lives
  until the engine answered its request), so the whole arena is punched out of its memfd
  (``fallocate(PUNCH_HOLE)``): the pages leave the front end and the engine alike and come back,
  zeroed, when requests touch them again. Not where TensorRT is installed: the engine may have
  pinned the arena for CUDA (``Arena.pin``), and pinned pages must stay where they are.

The check is a timer, off the hot path: a finished request costs one method call (``note``), the
trim runs only when no request is in flight and the resident size is ``threshold`` bytes above its
floor, and trims that give back little space themselves out (TrimPolicy).
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
from typing import Callable, Optional

log = logging.getLogger("trtserve.memory")

MiB = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    try:
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _libc()
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only (musl, macOS: none)
_FALLOCATE = getattr(_LIBC, "fallocate", None)
if _MALLOC_TRIM is not None:
    _MALLOC_TRIM.argtypes = [ctypes.c_size_t]
    _MALLOC_TRIM.restype = ctypes.c_int
if _FALLOCATE is not None:
    _FALLOCATE.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    _FALLOCATE.restype = ctypes.c_int


def resident_bytes() -> int:
    """This process's resident set (Linux /proc/self/statm), 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): free heap pages of every malloc arena go back to the OS. False where absent."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def arena_may_be_pinned() -> bool:
    """Whether the engine may have registered the arena with CUDA (Arena.pin, for TensorRT models). Punching
    pages the driver holds pinned would leave the engine reading the old pages while the front end writes new
    ones, so where TensorRT is installed the arena is never punched (malloc_trim still runs)."""
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def punch(fd: int, size: int) -> bool:
    """Drops the pages of [0, size) of a memfd (they read as zeros afterwards); False where unsupported."""
    if _FALLOCATE is None or fd < 0:
        return False
    return _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, size) == 0


class TrimPolicy:
    """When a trim is worth it. Compares the resident size with its *floor* (the lowest size seen right
    after a trim), not with the size after the last trim: a trim that runs in a pause in the middle of a
    burst gives back little (the burst still holds its buffers), and measured against that high mark the
    trim after the burst would never look due. A trim that gives back little doubles the wait before the
    next one (up to ``max_interval``); when that wait is at its longest the process has really grown (a
    model loaded, caches warmed) and its size becomes the new floor."""

    def __init__(self, floor: int, threshold: int, interval: float, max_interval: float) -> None:
        self.floor = floor
        self.threshold = threshold
        self.interval = interval
        self.max_interval = max(interval, max_interval)
        self.wait = interval  # seconds from one trim to the next
        self.last = float("-inf")  # monotonic time of the last trim

    def grown(self, resident: int) -> bool:
        """Whether there is enough to give back, whenever the next trim may run."""
        return resident - self.floor >= self.threshold

    def due(self, resident: int, now: float) -> bool:
        return self.grown(resident) and now - self.last >= self.wait

    def trimmed(self, before: int, after: int, now: float) -> None:
        self.last = now
        if before - after >= self.threshold // 2:
            self.wait = self.interval
        elif self.wait >= self.max_interval:
            self.floor, self.wait = after, self.interval  # grown for good: this is the new floor
        else:
            self.wait = min(self.wait * 2, self.max_interval)
        self.floor = min(self.floor, after)


class Trimmer:
    """Trims a front end when it is idle after its memory grew. ``note()`` once per finished request.

    ``busy()`` says whether anything may still read or write the arena (requests in flight, or blocks held
    by answers not yet read): the trim punches the arena's pages, and they read as zeros afterwards;
    ``arena_fd``/``arena_size`` the arena to punch (None: no arena)."""

    def __init__(self, busy: Callable[[], bool], arena_fd: Optional[int] = None, arena_size: int = 0,
                 threshold: int = 32 * MiB, interval: float = 1.0, max_interval: float = 30.0,
                 resident: Callable[[], int] = resident_bytes) -> None:
        self._busy = busy
        self._arena_fd = None if arena_may_be_pinned() else arena_fd
        self._arena_size = arena_size
        self._resident = resident
        self.policy = TrimPolicy(resident(), threshold, interval, max_interval)
        self._handle: Optional[asyncio.TimerHandle] = None
        self.trims = 0

    def note(self) -> None:
        """A request finished: look again in a moment (at most one timer pending)."""
        if self._handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            delay = max(0.1, self.policy.last + self.policy.wait - time.monotonic())
            self._handle = loop.call_later(delay, self._check)

    def _check(self) -> None:
        self._handle = None
        if self._busy():
            self.note()  # not idle yet: look again later
            return
        resident = self._resident()
        if not self.policy.grown(resident):
            return  # nothing to give back; the next request looks again
        if not self.policy.due(resident, time.monotonic()):
            # too soon after the last trim (a pause in the burst): the event loop may run a timer a little before
            # its time, and with no request left to look again the burst's memory would stay until the next one
            self.note()
            return
        if self.policy.grown(self.trim()):
            # grpc may still hold the last responses' buffers (an answer counts as done once handed to
            # grpc, not once written): look again after the policy's wait
            self.note()

    def trim(self) -> int:
        """Gives the memory back now; the caller makes sure no arena block is in use. The resident size after."""
        t0 = time.monotonic()
        before = self._resident()
        if self._arena_fd is not None and self._arena_size:
            punch(self._arena_fd, self._arena_size)
        malloc_trim()
        after = self._resident()
        self.policy.trimmed(before, after, time.monotonic())
        self.trims += 1
        log.debug("idle: gave back %.0f MiB in %.1f ms", (before - after) / MiB, (time.monotonic() - t0) * 1e3)
        return after


class PeriodicTrim:
    """For a process without a single idle signal (the engine): every ``interval`` seconds, malloc_trim(0)
    when the resident size has stopped growing (the burst is over) and is ``threshold`` bytes above its
    floor (TrimPolicy)."""

    def __init__(self, threshold: int = 32 * MiB, interval: float = 1.0, max_interval: float = 30.0,
                 resident: Callable[[], int] = resident_bytes) -> None:
        self._interval = interval
        self._resident = resident
        self.policy = TrimPolicy(resident(), threshold, interval, max_interval)
        self._previous = self.policy.floor
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        if _MALLOC_TRIM is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.tick()

    async def tick(self) -> bool:
        """One look: trims when due. True when it trimmed."""
        now = self._resident()
        settled = now <= self._previous + self.policy.threshold // 8
        self._previous = now
        if not (settled and self.policy.due(now, time.monotonic())):
            return False
        # ctypes releases the GIL: the instance threads go on meanwhile
        await asyncio.get_running_loop().run_in_executor(None, malloc_trim)
        self._previous = after = self._resident()
        self.policy.trimmed(now, after, time.monotonic())
        return True

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


__all__ = ["TrimPolicy", "Trimmer", "PeriodicTrim", "malloc_trim", "punch", "resident_bytes"]
