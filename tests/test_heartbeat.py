"""The child side of the supervisor's watchdog (server/process/heartbeat.py): beats come from the running loop,
a supervisor that reads late never blocks the child, and a supervisor that is gone ends the beats."""
from __future__ import annotations

import asyncio
import fcntl
import os
import time

from trtserve.server.process.heartbeat import Heartbeat, beat_interval, read_beats


def test_a_few_beats_fit_in_the_watchdog_window_and_at_most_one_a_second() -> None:
    assert beat_interval(30.0) == 1.0
    assert beat_interval(1.0) == 0.25


async def test_beats_arrive_while_the_loop_runs_and_stop_when_it_does_not() -> None:
    r, w = os.pipe()
    seen = []
    with open(r, "rb", buffering=0) as pipe:
        transport = await read_beats(pipe, seen.append)
        Heartbeat(w, 0.02).start()
        await asyncio.sleep(0.3)
        assert len(seen) >= 5
        stalled_from = len(seen)
        time.sleep(0.2)  # the loop does not run: no beat is written meanwhile
        assert len(seen) == stalled_from
        await asyncio.sleep(0.1)
        assert len(seen) > stalled_from
        transport.close()


async def test_a_full_pipe_never_blocks_the_loop_and_a_closed_one_ends_the_beats() -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: a small pipe, filled below
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 4096)
    except BlockingIOError:
        pass
    beat = Heartbeat(w, 0.01)
    beat.start()  # the pipe is full: the beat is skipped, not waited for
    await asyncio.sleep(0.05)
    os.close(r)  # the supervisor is gone
    await asyncio.sleep(0.05)
    last = beat._handle
    await asyncio.sleep(0.05)
    assert beat._handle is last and last.when() < asyncio.get_running_loop().time()  # nothing scheduled since
    try:
        os.fstat(w)
        closed = False
    except OSError:
        closed = True
    assert closed  # the heartbeat closed its end of the pipe
