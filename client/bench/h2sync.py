"""The threads engine's calls over our own HTTP/2 (h2conn.py) on blocking sockets.

A closed loop with a few requests in flight is where the client's own cost shows: at concurrency
1 every microsecond it spends is latency. Here a call is one ``sendall`` and blocking ``recv``
until its answer, on the calling thread: no event loop, no thread hand-off. That is why each
calling thread gets its own connection: sharing one would need a reader thread to hand answers
over, the very cost this path avoids (and a few connections cost the server nothing).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import List, Optional

from trtserve.client.bench.h2conn import CallResult, H2Connection, ProtocolError
from trtserve.client.bench.h2target import H2Target

__all__ = ["H2ThreadLoad"]

_RECV_BYTES = 1 << 20


class _BlockingConnection:
    """One socket and its HTTP/2 state, used by one thread at a time."""

    def __init__(self, sock: socket.socket, state: H2Connection) -> None:
        self.sock = sock
        self.state = state
        self.results: List[CallResult] = []
        # one receive buffer for the connection's life: recv(1 MiB) would allocate (and for that size mmap
        # and unmap) a fresh MiB on every call, which measured as half of this client's system time
        self._buf = bytearray(_RECV_BYTES)
        self._view = memoryview(self._buf)
        sock.sendall(state.data_to_send())

    def call(self, message: bytes, timeout_s: Optional[float]) -> CallResult:
        """One call to its answer; ProtocolError when the connection takes no new call (it never went out)."""
        state = self.state
        call_id = state.start_call(message, timeout_s)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            self.sock.sendall(state.data_to_send())
            while True:
                for r in self.results:
                    if r.call_id == call_id:
                        self.results.remove(r)
                        return r
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        result = state.cancel(call_id, "DEADLINE_EXCEEDED", "deadline exceeded")
                        self.sock.sendall(state.data_to_send())
                        if result is not None:
                            return result
                        continue  # it finished just now
                    self.sock.settimeout(left)
                try:
                    n = self.sock.recv_into(self._buf)
                except socket.timeout:
                    continue
                if not n:
                    raise ConnectionError("closed by the server")
                self.results.extend(state.receive(self._view[:n]))
                out = state.data_to_send()
                if out:
                    self.sock.sendall(out)
        except ProtocolError as e:
            self.close()
            return self._fail(call_id, "INTERNAL", f"HTTP/2 protocol error from the server: {e}")
        except OSError as e:  # ConnectionError included
            self.close()
            return self._fail(call_id, "UNAVAILABLE", f"connection lost: {e}")

    def _fail(self, call_id: int, status: str, details: str) -> CallResult:
        for r in self.results + self.state.fail_all(status, details):
            if r.call_id == call_id:
                return r
        return CallResult(call_id, status, details)

    def usable(self) -> bool:
        return self.state.closed is None

    def close(self) -> None:
        self.state.closed = self.state.closed or "closed"
        try:
            self.sock.close()
        except OSError:
            pass


class H2ThreadLoad:
    """Blocking HTTP/2 calls for the threads engine; ``with H2ThreadLoad(...)``. One connection per
    calling thread, opened on its first call (``channels`` is only what the engine spreads over)."""

    def __init__(self, target: H2Target, payload: bytes, channels: int, timeout_s: Optional[float] = None) -> None:
        self._target = target
        self._payload = payload
        self._n = max(1, channels)
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: List[_BlockingConnection] = []

    def __enter__(self) -> "H2ThreadLoad":
        self._connection()  # fail now, with a clear error, when the server is not there
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    @property
    def channels(self) -> int:
        return self._n

    def _connection(self) -> _BlockingConnection:
        conn: Optional[_BlockingConnection] = getattr(self._local, "conn", None)
        if conn is not None:
            if conn.usable():
                return conn
            conn.close()  # GOAWAY or broken: done with it
            with self._lock:
                if conn in self._all:  # (__exit__ may have closed them all meanwhile)
                    self._all.remove(conn)
        t = self._target
        sock = socket.create_connection((t.host, t.port), timeout=30.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if t.ssl is not None:
                sock = t.ssl.wrap_socket(sock, server_hostname=t.server_hostname)
                if sock.selected_alpn_protocol() != "h2":
                    raise ConnectionError(f"{t.authority} did not agree to HTTP/2 over TLS")
            sock.settimeout(None)
            conn = _BlockingConnection(sock, t.new_state())
        except BaseException:
            sock.close()
            raise
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def call_result(self, index: int = 0, message: Optional[bytes] = None) -> CallResult:
        """One blocking ModelInfer on this thread's connection; the whole result."""
        for attempt in range(2):
            try:
                conn = self._connection()
            except OSError as e:
                return CallResult(-1, "UNAVAILABLE", f"could not connect to {self._target.authority}: {e}")
            try:
                return conn.call(self._payload if message is None else message, self._timeout_s)
            except ProtocolError as e:  # closed before the call went out (GOAWAY, stream ids spent):
                if attempt:  # once more on a new connection, then it is UNAVAILABLE
                    return CallResult(-1, "UNAVAILABLE", str(e))
        raise AssertionError("unreachable")

    def call(self, index: int) -> Optional[str]:
        """One blocking ModelInfer; None on success, else the status name (ThreadLoad's interface)."""
        return self.call_result(index).status
