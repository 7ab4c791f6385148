"""The load spread over several generator processes (``trtserve bench --processes N``).

One Python process drives about 19,000 requests/s on h2, 10,000-15,000 on grpcio (ceiling.py, 16-core
host, docs/client.md); a server that answers faster needs more. Each worker process opens its own
channels once, then runs every level with its share
(concurrency N split as evenly as possible, or rate R/N with its own Poisson seed: independent
Poisson streams add up to one at rate R). The parent picks a start time on the shared monotonic
clock, so every worker's window is the same interval and their records simply concatenate.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import List, Mapping, Optional, Tuple

from trtserve.client.bench.load import LevelRecords, Load, run_closed, run_open

__all__ = ["ProcessPool", "split"]

_START_SLACK_S = 0.3  # time for every worker to receive the command before the common start


def split(total: float, parts: int, integer: bool) -> List[float]:
    """``total`` in ``parts`` shares: integers differing by at most one, or equal floats."""
    if integer:
        base, extra = divmod(int(total), parts)
        return [base + (1 if i < extra else 0) for i in range(parts)]
    return [total / parts] * parts


async def _worker_main(conn, spec_kwargs: Mapping[str, object], payload: bytes, channels: int,
                       timeout_s: Optional[float], transport: str = "grpcio") -> None:
    from trtserve.client._channel import make_spec
    from trtserve.client.bench.h2load import H2Load
    from trtserve.client.bench.h2target import H2Target

    loop = asyncio.get_running_loop()
    spec = make_spec(**dict(spec_kwargs))
    if transport == "h2":
        tls = {k: v for k, v in spec_kwargs.items() if k not in ("url", "headers", "retries")}
        load = H2Load(H2Target.from_url(str(spec_kwargs["url"]), spec.metadata, tls), payload, channels, timeout_s)
    else:
        load = Load(spec, payload, channels, timeout_s)
    async with load:
        conn.send("ready")
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command is None:
                return
            mode, share, warmup_s, duration_s, seed, start_at = command
            if share <= 0:
                rec = LevelRecords(start_at + warmup_s, start_at + warmup_s + duration_s)
            elif mode == "concurrency":
                rec = await run_closed(load, int(share), warmup_s, duration_s, start_at=start_at)
            else:
                rec = await run_open(load, share, warmup_s, duration_s, seed, start_at=start_at)
            conn.send((rec.window_start, rec.window_end, rec.ok, rec.errors, rec.send_lags, rec.last_done))


def _worker(conn, spec_kwargs, payload, channels, timeout_s, transport) -> None:
    try:
        asyncio.run(_worker_main(conn, spec_kwargs, payload, channels, timeout_s, transport))
    except BaseException as e:  # the parent reads this instead of waiting forever
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass


class ProcessPool:
    """``n`` generator processes with their channels; ``run_level`` returns the merged records."""

    def __init__(self, n: int, spec_kwargs: Mapping[str, object], payload: bytes, channels_each: int,
                 timeout_s: Optional[float], transport: str = "grpcio") -> None:
        self._n = n
        self._args = (dict(spec_kwargs), payload, max(1, channels_each), timeout_s, transport)
        self._procs: List[Tuple[mp.process.BaseProcess, object]] = []

    def __enter__(self) -> "ProcessPool":
        ctx = mp.get_context("spawn")  # gRPC does not survive fork
        try:
            for _ in range(self._n):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, *self._args), daemon=True)
                proc.start()
                child.close()
                self._procs.append((proc, parent))
            for _, conn in self._procs:
                self._expect(conn, 60.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc, conn in self._procs:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
            conn.close()

    @staticmethod
    def _expect(conn, timeout_s: float):
        if not conn.poll(timeout_s):
            raise RuntimeError(f"a load generator process did not answer within {timeout_s:.0f} s")
        message = conn.recv()
        if isinstance(message, tuple) and len(message) == 2 and message[0] == "error":
            raise RuntimeError(f"load generator process failed: {message[1]}")
        return message

    def run_level(self, mode: str, level: float, warmup_s: float, duration_s: float, seed: int,
                  start_at: Optional[float] = None) -> LevelRecords:
        """Runs one level on every process at once (blocking) and concatenates their records."""
        shares = split(level, self._n, integer=mode == "concurrency")
        start_at = max(start_at or 0.0, time.monotonic() + _START_SLACK_S)
        for i, ((_, conn), share) in enumerate(zip(self._procs, shares)):
            conn.send((mode, share, warmup_s, duration_s, seed * 1009 + i, start_at))
        merged = LevelRecords(start_at + warmup_s, start_at + warmup_s + duration_s)
        limit = _START_SLACK_S + warmup_s + duration_s + 120.0  # the last answers may take a request timeout
        for _, conn in self._procs:
            window_start, window_end, ok, errors, lags, last_done = self._expect(conn, limit)
            merged.ok.extend(ok)
            merged.errors.extend(errors)
            merged.send_lags.extend(lags)
            merged.last_done = max(merged.last_done, last_done)
        return merged


def channels_each(total_channels: int, processes: int) -> int:
    """Channels per process so that the processes together open about ``total_channels``."""
    return max(1, -(-total_channels // processes))
