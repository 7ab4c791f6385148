"""Where the server's processes run (--engine-cpus): the engine on CPUs of its own, the front ends on the others.

The engine's event loop forms, enqueues and answers every batch, so time it loses to another process on its core
is time no batch is formed in. Left to the OS, the engine shares cores with the front ends and whatever else runs on
the host; with --engine-cpus no front end of this server runs on the engine's CPUs (docs/architecture.md gives what
that did to throughput). Linux only (sched_setaffinity); each child applies its own placement at start
(child.run_on), so a front end started again is placed as the first was.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Set, Tuple


def cpu_list(text: str) -> Set[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8} (taskset's list format; "" -> none). ValueError for anything else."""
    out: Set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            first, last = -1, -1
        if first < 0 or last < first:
            raise ValueError(f"{part!r} is not a CPU or a range of CPUs (a list such as 0-1,8)")
        out.update(range(first, last + 1))
    return out


def engine_cpus(value: str, allowed: Optional[Set[int]] = None) -> Tuple[int, ...]:
    """The --engine-cpus value, read (``cpu_list``) and checked (``checked``). ValueError otherwise."""
    return checked(cpu_list(value), allowed)


def checked(cpus: Set[int], allowed: Optional[Set[int]] = None) -> Tuple[int, ...]:
    """``cpus`` for the engine, sorted, if they are among those this process may use (``allowed``, default its
    affinity) and leave at least one for the front ends. ValueError otherwise."""
    if allowed is None:
        if not hasattr(os, "sched_getaffinity"):
            raise ValueError("placing processes on CPUs needs Linux")
        allowed = set(os.sched_getaffinity(0))
    if not cpus:
        raise ValueError("names no CPU")
    outside = cpus - allowed
    if outside:
        raise ValueError(f"CPU {', '.join(map(str, sorted(outside)))} is not among the CPUs this server may use "
                         f"({', '.join(map(str, sorted(allowed)))})")
    if not allowed - cpus:
        raise ValueError("leaves no CPU for the front ends: name fewer CPUs")
    return tuple(sorted(cpus))


def frontend_cpus(engine: Iterable[int]) -> Tuple[int, ...]:
    """The CPUs left to the front ends: those this process may use but the engine's."""
    return tuple(sorted(set(os.sched_getaffinity(0)) - set(engine)))
