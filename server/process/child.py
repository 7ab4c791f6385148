"""What every child process of the supervisor does the same way: read its boot payload, die with its
parent, report readiness, and stop on SIGTERM.

The supervisor writes a pickled dict to the child's stdin and reads one JSON line from its stdout once the
child is ready (stdout carries nothing else); logs go to stderr, which the child shares with the supervisor.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import pickle
import signal
import sys
from typing import Any, Dict, Iterable, List, Optional

from trtserve.server.process.heartbeat import Heartbeat

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), so a killed supervisor leaves no orphan holding
    the GPU or the port; exits at once when the parent is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own stop still stops us
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def boot() -> Dict[str, Any]:
    """The payload the supervisor sent; sets up logging as the supervisor's."""
    payload = pickle.load(sys.stdin.buffer)
    die_with_parent(payload["parent_pid"])
    logging.basicConfig(level=payload.get("log_level", logging.INFO),
                        format=f"%(asctime)s %(levelname)s {payload['role']}: %(name)s: %(message)s")
    if payload.get("switch_interval"):
        sys.setswitchinterval(payload["switch_interval"])
    if payload.get("cpus"):
        run_on(payload["cpus"])
    return payload


def _threads() -> List[int]:
    """This process's threads (Linux), or this thread alone where /proc cannot tell."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def run_on(cpus: Iterable[int]) -> None:
    """Every thread of this process on ``cpus`` (threads started later inherit it): the CPU placement the
    supervisor chose (--engine-cpus). Threads exist before this runs (those libraries start at import)."""
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that ended since the listing
            continue


def schedule_as_batch() -> bool:
    """SCHED_BATCH for every thread of this process (Linux; threads started later inherit it): such a thread woken
    by another process's write does not preempt the writer, it waits for the writer's slice or for a free core.
    False where the platform has no such policy or refuses it."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    for tid in _threads():
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended since the listing
            continue
        except OSError as e:  # a sandbox that filters the call: keep the policy the process has
            logging.getLogger("trtserve.process").warning("cannot set SCHED_BATCH (%s); front ends keep their "
                                                          "policy", e)
            return False
    return True


def report_ready(info: Dict[str, Any], beat_interval: Optional[float] = None) -> None:
    """One JSON line on stdout: the supervisor's start() waits for it. The pipe then carries only heartbeats
    (heartbeat.py), every ``beat_interval`` seconds from the running loop, or nothing when that is None; fd 1
    becomes /dev/null, so that nothing a library prints can pass for a beat."""
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    pipe = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    if beat_interval is None:
        os.close(pipe)
    else:
        Heartbeat(pipe, beat_interval).start()


def settle_heap() -> None:
    """Once the process holds what it keeps for its life (modules, models, servers): move all of it out of the
    cyclic garbage collector's view and let the young generation grow larger before a collection. Every
    request allocates futures, tuples and arrays; with the defaults a collection ran every few dozen
    requests and walked every object of the process, a fifth to a quarter of the engine's time per request
    under load (profiled with py-spy). Reference counting still frees nearly everything at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


def stop_event() -> "asyncio.Event":
    """Set by SIGTERM or SIGINT."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
