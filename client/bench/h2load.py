"""``--transport h2`` on asyncio: the load generator's calls over its own HTTP/2 connections (h2conn.py).

Same interface as load.py's ``Load`` (``channels``, ``send(index)``), so run_closed and run_open
drive either. Each connection is an ``asyncio.Protocol``: received bytes go straight into the
connection state, and a finished call resolves its future in the same callback, with no thread
in between (grpc.aio hands each completion from gRPC's poller thread to the loop). Measured on the
2-core box against the trivial server at concurrency 1: ~70 us of client CPU per call and p50
below perf_analyzer's, vs ~300 us and 0.7 ms through grpcio (bench/client_floor.py).

A connection that breaks (server restart, GOAWAY) fails its unfinished calls (UNAVAILABLE for those
the server never saw, as gRPC does) and the next call opens a new one; the benchmark counts those
errors instead of hiding them behind a retry.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Dict, List, Optional, Tuple

from trtserve.client._errors import InferenceServerError
from trtserve.client.bench.h2conn import CallResult, H2Connection, ProtocolError
from trtserve.client.bench.h2target import H2Target

__all__ = ["H2Load"]

_CONNECT_TIMEOUT_S = 30.0


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; resolves each call's future as its answer arrives."""

    def __init__(self, state: H2Connection) -> None:
        self.state = state
        self.transport: Optional[asyncio.Transport] = None
        self.waiters: Dict[int, asyncio.Future] = {}
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def flush(self) -> None:
        out = self.state.data_to_send()
        if out and self.transport is not None and not self.lost:
            self.transport.write(out)

    def data_received(self, data: bytes) -> None:
        try:
            finished = self.state.receive(data)
        except ProtocolError as e:
            self._resolve(self.state.fail_all("INTERNAL", f"HTTP/2 protocol error from the server: {e}"))
            self.lost = True
            if self.transport is not None:
                self.transport.close()
            return
        self.flush()
        self._resolve(finished)
        if self.state.closed is not None and not self.state.active and self.transport is not None:
            self.transport.close()  # after GOAWAY, once the last call has its answer

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True
        self._resolve(self.state.fail_all("UNAVAILABLE", f"connection lost: {exc or 'closed by the server'}"))

    def _resolve(self, results: List[CallResult]) -> None:
        for r in results:
            fut = self.waiters.pop(r.call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(r)

    def usable(self) -> bool:
        return not self.lost and self.state.closed is None

    def call(self, message: bytes, timeout_s: Optional[float]) -> Tuple[int, "asyncio.Future[CallResult]"]:
        call_id = self.state.start_call(message, timeout_s)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[call_id] = fut
        self.flush()
        return call_id, fut

    def expire(self, call_id: int) -> None:
        """The deadline passed: reset the stream and answer DEADLINE_EXCEEDED (as grpcio does)."""
        result = self.state.cancel(call_id, "DEADLINE_EXCEEDED", "deadline exceeded")
        if result is not None:  # None: it finished in the meantime
            self.flush()
            self._resolve([result])


class H2Load:
    """``channels`` HTTP/2 connections for one benchmark run; ``async with H2Load(...)``."""

    def __init__(self, target: H2Target, payload: bytes, channels: int, timeout_s: Optional[float] = None) -> None:
        self._target = target
        self._payload = payload
        self._n = max(1, channels)
        self._timeout_s = timeout_s
        self._conns: List[Optional[_Connection]] = [None] * self._n
        self._connecting: Dict[int, asyncio.Future] = {}

    async def __aenter__(self) -> "H2Load":
        try:
            for i in range(self._n):
                await self._connect(i)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self._conns:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    @property
    def channels(self) -> int:
        return self._n

    async def _connect(self, i: int) -> _Connection:
        """Opens connection ``i`` (one at a time per slot: calls that find it broken wait for one)."""
        pending = self._connecting.get(i)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        pending = loop.create_future()
        self._connecting[i] = pending
        t = self._target
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(t.new_state()), t.host, t.port, ssl=t.ssl, server_hostname=t.server_hostname),
                _CONNECT_TIMEOUT_S)
            if t.ssl is not None:
                alpn = conn.transport.get_extra_info("ssl_object").selected_alpn_protocol()
                if alpn != "h2":
                    conn.transport.close()
                    raise InferenceServerError("UNAVAILABLE", f"{t.authority} did not agree to HTTP/2 over TLS "
                                                              f"(ALPN {alpn!r})")
            self._conns[i] = conn
            pending.set_result(conn)
            return conn
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            err = InferenceServerError("UNAVAILABLE", f"could not connect to {t.authority}: {e or type(e).__name__}")
            pending.set_exception(err)
            pending.exception()  # retrieved: waiters get it through shield, nobody else must see it unhandled
            raise err from None
        except BaseException as e:
            pending.set_exception(e)
            pending.exception()
            raise
        finally:
            del self._connecting[i]

    async def send(self, index: int) -> Optional[str]:
        """One ModelInfer on connection ``index % channels``; None on success, else the status name."""
        result = await self.call(index)
        return result.status

    async def call(self, index: int, message: Optional[bytes] = None) -> CallResult:
        """One ModelInfer with ``message`` (default: the benchmark's payload); the whole result."""
        i = index % self._n
        for attempt in range(2):
            conn = self._conns[i]
            if conn is None or not conn.usable():
                try:
                    conn = await self._connect(i)
                except InferenceServerError as e:
                    return CallResult(-1, e.status, e.message)
            try:
                call_id, fut = conn.call(self._payload if message is None else message, self._timeout_s)
                break
            except ProtocolError as e:  # closed (GOAWAY, stream ids spent, lost while connecting) before
                if attempt:  # the call went out: once more on a new connection, then it is UNAVAILABLE
                    return CallResult(-1, "UNAVAILABLE", str(e))
        if self._timeout_s is None:
            return await fut
        timer = asyncio.get_running_loop().call_later(self._timeout_s, conn.expire, call_id)
        try:
            return await fut
        finally:
            timer.cancel()
