"""A one-shot wake-up on the running event loop at sub-millisecond precision, without spinning.

The batcher waits fractions of a millisecond: ``max_queue_delay_microseconds`` and the hold of a partial batch
(engine/batcher/policy.py) are often a few hundred microseconds. The event loops keep time in milliseconds:
uvloop's ``call_later`` runs any delay under half a millisecond as ``call_soon``, so a loop that waits until a
moment 300 us away wakes at once, finds the moment not reached and waits again, a busy wait for the whole delay;
asyncio's loop rounds a wait up to whole milliseconds, so a 300 us delay lasts about a millisecond. On Linux the
alarm is a timerfd instead, armed with nanoseconds and read by the loop like any socket: the loop sleeps until that
moment and no longer. Elsewhere it falls back to ``call_later`` with the delay rounded up to a millisecond: late, but
never a spin.

The batcher sets the alarm on most turns of its loop and cancels it on every wake-up, and each arming is a system
call that reprograms a kernel timer, costly next to the rest of a turn. So the timer is armed for an absolute moment,
rounded up to a whole microsecond, and left alone when a later turn asks for the same moment again; a cancel only
stops the callback, and an expiry that nobody wants any more is read and dropped.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time
from typing import Callable, Optional

_MS = 0.001


class _TimerFd:
    """timerfd_create / timerfd_settime from libc (the os module has them only from Python 3.13)."""

    CLOCK_MONOTONIC = 1  # the clock of time.monotonic_ns on Linux
    NONBLOCK_CLOEXEC = 0o4000 | 0o2000000  # TFD_NONBLOCK | TFD_CLOEXEC, as O_NONBLOCK | O_CLOEXEC
    ABSTIME = 1  # TFD_TIMER_ABSTIME

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._settime = libc.timerfd_settime
        self._settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        # struct itimerspec: it_interval (sec, nsec), then it_value (sec, nsec); no interval: it fires once
        self._spec = (ctypes.c_long * 4)()
        self._spec_ref = ctypes.byref(self._spec)
        fd = libc.timerfd_create(self.CLOCK_MONOTONIC, self.NONBLOCK_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd = fd

    def arm_at(self, ns: int) -> None:
        """Fires once at ``ns`` (> 0) on the monotonic clock, at once if that has passed; drops an expiry not read
        yet."""
        self._spec[2], self._spec[3] = divmod(ns, 1_000_000_000)
        if self._settime(self.fd, self.ABSTIME, self._spec_ref, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")


def _timerfd() -> Optional[_TimerFd]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return _TimerFd()
    except (OSError, AttributeError):  # no timerfd here (an old kernel, a libc without it)
        return None


class Alarm:
    """Calls ``callback`` on the running loop once ``set``'s delay has passed, unless cancelled or set again first.
    Create and use it on the loop's thread; ``close`` it when done (it holds a descriptor)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._loop = asyncio.get_running_loop()
        self._timer = _timerfd()
        self._due = 0  # the monotonic ns the timer is armed for; 0: not armed, or its expiry was read
        self._wanted = False  # whether the timer's expiry calls back (a cancel leaves the timer armed)
        self._handle: Optional[asyncio.Handle] = None  # a delay of 0, or the fallback's timer
        if self._timer is not None:
            self._loop.add_reader(self._timer.fd, self._fired)

    def set(self, delay_s: float, since: Optional[float] = None) -> None:
        """Fires ``delay_s`` after ``since`` (a ``time.monotonic()`` reading; default: now), at once, on the next loop
        turn, for a moment that has passed; replaces any earlier set. A caller that reads the clock once per turn
        passes its reading, so the same moment asked for again finds the timer armed for it already."""
        if self._timer is not None:
            now = time.monotonic_ns()
            start = now if since is None else int(since * 1e9)
            due = -(-(start + int(delay_s * 1e9)) // 1000) * 1000  # rounded up to a microsecond: never early
            if due > now:
                if self._handle is not None:
                    self._handle.cancel()
                    self._handle = None
                if due != self._due:
                    self._timer.arm_at(due)  # replaces an earlier arming and drops an expiry not read yet
                    self._due = due
                self._wanted = True
                return
        else:
            if since is not None:
                delay_s -= time.monotonic() - since
            if delay_s > 0:
                self.cancel()
                self._handle = self._loop.call_later(max(delay_s, _MS), self._callback)
                return
        self.cancel()
        self._handle = self._loop.call_soon(self._callback)

    def cancel(self) -> None:
        """Nothing fires until the next ``set``, even an expiry the loop has not read yet. The timer stays armed: its
        expiry, if it comes, is read and dropped (cheaper than a disarm on every wake-up of the batcher)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._wanted = False

    def _fired(self) -> None:
        assert self._timer is not None
        try:
            os.read(self._timer.fd, 8)
        except BlockingIOError:  # armed again after it expired, before this callback ran
            return
        self._due = 0
        if self._wanted:
            self._wanted = False
            self._callback()

    def close(self) -> None:
        """Cancels and gives the descriptor back; closing twice is fine."""
        self.cancel()
        if self._timer is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._timer.fd)
            os.close(self._timer.fd)
            self._timer = None


__all__ = ["Alarm"]
