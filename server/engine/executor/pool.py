"""N instance slots, one thread each: blocking backend work runs off the event loop, one batch per
instance at a time (an instance owns one execution context + stream, which must not run twice).

An instance may hold ``depth`` batches: the running one and, behind it in its thread's FIFO, the
next one, which starts without waiting for the event loop (see policy rule 5). For a pipelined backend
each instance also gets a completion thread: the instance's thread enqueues a batch and goes on to the
next while the completion thread waits for the first, so the two batches overlap on the device."""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Callable, Dict, List, Optional, Set, TypeVar

T = TypeVar("T")

log = logging.getLogger("trtserve.executor")


class ExecutorPool:
    """Tracks how many batches each instance holds; ``submit`` runs work on that instance's own thread."""

    def __init__(self, count: int, name: str = "trtserve", depth: int = 2, completion: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._threads: List[concurrent.futures.ThreadPoolExecutor] = [
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-inst{i}")
            for i in range(count)
        ]
        self._completion: List[_Worker] = [_Worker(f"{name}-done{i}") for i in range(count)] if completion else []
        self._held: Dict[int, int] = {i: 0 for i in range(count)}
        self._depth = depth

    @property
    def size(self) -> int:
        return len(self._threads)

    def free(self) -> Set[int]:
        """Idle instances (nothing running)."""
        return {i for i, n in self._held.items() if n == 0}

    def queueable(self) -> Set[int]:
        """Busy instances that can take one more batch behind the running one."""
        return {i for i, n in self._held.items() if 0 < n < self._depth}

    def holds(self, instance: int) -> int:
        """Batches ``instance`` holds now (read from any thread: a plain dict read)."""
        return self._held[instance]

    def busy(self) -> bool:
        return any(self._held.values())

    def acquire(self, instance: int) -> None:
        if self._held[instance] >= self._depth:
            raise RuntimeError(f"instance {instance} already holds {self._held[instance]} batches")
        self._held[instance] += 1

    def release(self, instance: int) -> None:
        if self._held[instance] <= 0:
            raise RuntimeError(f"instance {instance} holds no batch")
        self._held[instance] -= 1

    def submit(self, instance: int, fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
        """Starts ``fn`` on the instance's thread; the caller hands the result back to its loop itself."""
        return self._threads[instance].submit(fn)

    def complete(self, instance: int, fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
        """Runs ``fn`` on the instance's completion thread (FIFO: batches finish in the order they started)."""
        future: "concurrent.futures.Future[T]" = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the caller reads it from the future
                future.set_exception(e)

        self._completion[instance].put(run)
        return future

    def after(self, instance: int, fn: Callable[[], None]) -> None:
        """Runs ``fn`` on the instance's completion thread, in order, with nothing handed back: ``fn`` tells its
        loop itself and must not raise (no future per batch: the engine's loop waits for the GIL while the
        completion thread holds it, so what that thread does per batch is kept to the least)."""
        self._completion[instance].put(fn)

    def shutdown(self) -> None:
        for t in self._threads:  # instance threads first: they feed the completion threads
            t.shutdown(wait=True)
        for w in self._completion:
            w.stop()


class _Worker:
    """One thread running the callables put to it, in order (a ThreadPoolExecutor of one thread without the
    future, work item and condition it makes per call)."""

    def __init__(self, name: str) -> None:
        self._queue: "queue.SimpleQueue[Optional[Callable[[], None]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            fn = get()
            if fn is None:
                return
            try:
                fn()
            except BaseException:  # noqa: BLE001 - a callable that raised must not stop the ones behind it
                log.exception("completion work failed")

    def stop(self) -> None:
        """Runs what was put before, then ends the thread."""
        self._queue.put(None)
        self._thread.join()
