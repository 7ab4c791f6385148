"""N instance slots, one thread each: blocking backend work runs off the event loop, one batch per
instance at a time (an instance owns one execution context + stream, which must not run twice)."""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, List, Set, TypeVar

T = TypeVar("T")


class ExecutorPool:
    """Tracks which instances are free; ``run`` executes on that instance's own thread."""

    def __init__(self, count: int, name: str = "trtserve") -> None:
        self._threads: List[concurrent.futures.ThreadPoolExecutor] = [
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-inst{i}")
            for i in range(count)
        ]
        self._free: Set[int] = set(range(count))

    @property
    def size(self) -> int:
        return len(self._threads)

    def free(self) -> Set[int]:
        return set(self._free)

    def acquire(self, instance: int) -> None:
        if instance not in self._free:
            raise RuntimeError(f"instance {instance} is already running a batch")
        self._free.discard(instance)

    def release(self, instance: int) -> None:
        self._free.add(instance)

    async def run(self, instance: int, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads[instance], fn)

    def shutdown(self) -> None:
        for t in self._threads:
            t.shutdown(wait=True)
