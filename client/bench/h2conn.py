"""The client side of one HTTP/2 connection carrying gRPC unary calls, without I/O (sans-IO).

Why the load generator has its own: grpcio's client spends ~200-300 us of CPU per unary call
(bench/client_floor.py; C-core call setup, completion queues, thread hand-offs), which at
concurrency 1 is a third of a fast server's round trip and made ``trtserve bench`` report 30 %
more latency than perf_analyzer's C++ client. A unary call is a small, fixed exchange: HEADERS
(encoded once) and DATA out; HEADERS, DATA and trailers back. Doing just that in Python costs
~70 us a call. The general-purpose pure-Python HTTP/2 stack (``h2``) measured slower than grpcio.

What it implements (RFC 9113 as a client, gRPC's HTTP/2 protocol for unary calls): the preface
and SETTINGS exchange, flow control both ways (send windows per connection and stream, our
receive window kept open), MAX_CONCURRENT_STREAMS (calls past it wait, in order), padding and
priority fields, CONTINUATION, PING answers, RST_STREAM and GOAWAY (calls the server never
processed fail UNAVAILABLE), and gRPC's status mapping for HTTP statuses and stream resets. It
does not implement server push (disabled in SETTINGS), compression, or streaming calls.

Use: ``start_call`` returns a call id; feed every received byte string to ``receive``, which
returns the finished calls; after either, send ``data_to_send()``.
"""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import unquote

import grpc

from trtserve.client.bench.hpack import Decoder, HpackError, encode_block, encode_literal

__all__ = ["CallResult", "H2Connection", "ProtocolError", "grpc_timeout"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 1, 2, 3, 4, 5
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
OUR_MAX_FRAME = 2**24 - 1  # the largest allowed: a big response arrives in few frames, so few Python loops
_REPLENISH_AT = 2**30  # connection window consumed before we reopen it

# gRPC's HTTP/2 spec: RST_STREAM codes and HTTP statuses as gRPC status names
_RST_STATUS = {7: "UNAVAILABLE", 8: "CANCELLED", 11: "RESOURCE_EXHAUSTED", 12: "PERMISSION_DENIED"}
_HTTP_STATUS = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}
STATUS_NAMES: Dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}  # 3 -> "INVALID_ARGUMENT"


class ProtocolError(Exception):
    """The peer broke HTTP/2 (or HPACK); the connection is closed and every call on it fails."""


@dataclass
class CallResult:
    """One finished call: ``status`` None for OK, else a gRPC status name; ``message`` is the response."""

    call_id: int
    status: Optional[str]
    details: str = ""
    message: bytes = b""


@dataclass
class _Stream:
    sid: int
    body: memoryview  # what is still to send (gRPC-framed request)
    window: int  # our send window on this stream
    headers: bytes
    received: bytearray = field(default_factory=bytearray)
    http_status: Optional[str] = None
    grpc_status: Optional[str] = None
    details: str = ""
    blocked: bool = False  # in H2Connection._blocked, waiting for a window update


def grpc_timeout(seconds: float) -> str:
    """A grpc-timeout header value: at most 8 digits, the finest unit that fits."""
    for unit, scale in (("n", 1e9), ("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = int(max(0.0, seconds) * scale)
        if value < 10**8:
            return f"{value}{unit}"
    return "99999999H"


_FRAME_HEADER = struct.Struct(">BHBBI")  # 24-bit length as 8 + 16 bits, type, flags, stream id


def _frame_header(kind: int, flags: int, sid: int, length: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, sid)


def _frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _frame_header(kind, flags, sid, len(payload)) + payload


def _status_from_trailers(stream: _Stream) -> Tuple[Optional[str], str]:
    if stream.grpc_status is None:
        if stream.http_status not in (None, "200"):
            code = int(stream.http_status) if stream.http_status.isdigit() else 0
            return _HTTP_STATUS.get(code, "UNKNOWN"), f"HTTP status {stream.http_status}"
        return "INTERNAL", "the server ended the call without a grpc-status"
    if stream.grpc_status == "0":
        return None, ""
    code = int(stream.grpc_status) if stream.grpc_status.isdigit() else -1
    return STATUS_NAMES.get(code, "UNKNOWN"), stream.details


class H2Connection:
    """One connection's state; every method is non-blocking and does no I/O."""

    def __init__(self, authority: str, path: str, scheme: str = "http",
                 metadata: Sequence[Tuple[str, str]] = ()) -> None:
        self._fixed_headers = encode_block([(":method", "POST"), (":scheme", scheme), (":path", path),
                                            (":authority", authority), ("content-type", "application/grpc"),
                                            ("te", "trailers"), ("user-agent", "trtserve-bench")]
                                           + [(k.lower(), v) for k, v in metadata])
        self._out: List[Union[bytes, memoryview]] = [PREFACE, _frame(SETTINGS, 0, 0, struct.pack(
            ">HIHIHI", S_ENABLE_PUSH, 0, S_INITIAL_WINDOW_SIZE, MAX_WINDOW, S_MAX_FRAME_SIZE, OUR_MAX_FRAME)),
            _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))]
        self._decoder = Decoder()
        self._next_sid = 1
        self._streams: Dict[int, _Stream] = {}  # started (HEADERS sent), not finished
        self._waiting: Deque[Tuple[int, bytes, bytes]] = deque()  # (call id, body, headers) past the stream limit
        self._blocked: Deque[int] = deque()  # streams with body left and no send window
        self._call_of: Dict[int, int] = {}  # stream id -> call id
        self._sid_of: Dict[int, int] = {}  # call id -> stream id
        self._next_call = 0
        self._send_window = 65535
        self._peer_initial_window = 65535
        self._peer_max_frame = 16384
        self._peer_max_streams = MAX_WINDOW
        self._consumed = 0  # received DATA bytes since we last reopened the connection window
        self._buf = bytearray()
        self._continuation: Optional[Tuple[int, int, bytearray]] = None  # (sid, flags, block so far)
        self._timeouts: Dict[float, bytes] = {}
        self._last_message: Optional[bytes] = None
        self._last_body = b""
        self.closed: Optional[str] = None  # why no new call can start (GOAWAY, protocol error)

    # ------------------------------------------------------------------ sending
    def start_call(self, message: bytes, timeout_s: Optional[float] = None,
                   metadata: Sequence[Tuple[str, str]] = ()) -> int:
        """Queues one unary call with a serialized request; returns its call id."""
        if self.closed is None and self._next_sid + 2 * len(self._waiting) > MAX_STREAM_ID:
            self.closed = "stream ids exhausted: a new connection takes the next call"
        if self.closed is not None:
            raise ProtocolError(self.closed)
        call_id = self._next_call
        self._next_call += 1
        headers = self._fixed_headers
        if timeout_s is not None:
            timeout = self._timeouts.get(timeout_s)
            if timeout is None:  # a benchmark sends one timeout on every call: encode it once
                timeout = self._timeouts[timeout_s] = encode_literal("grpc-timeout", grpc_timeout(timeout_s))
            headers += timeout
        if metadata:
            headers += b"".join(encode_literal(k.lower(), v) for k, v in metadata)
        if message is not self._last_message:  # a benchmark sends one request again and again: frame it once
            self._last_message = message
            self._last_body = b"\x00" + struct.pack(">I", len(message)) + message
        self._waiting.append((call_id, self._last_body, headers))
        self._open_waiting()
        return call_id

    def _open_waiting(self) -> None:
        while self._waiting and len(self._streams) < self._peer_max_streams and self.closed is None:
            call_id, body, headers = self._waiting.popleft()
            sid = self._next_sid  # start_call saw to it that every waiting call has one left
            self._next_sid += 2
            stream = _Stream(sid, memoryview(body), self._peer_initial_window, headers)
            self._streams[sid] = stream
            self._call_of[sid] = call_id
            self._sid_of[call_id] = sid
            self._send_headers(stream)
            self._send_body(stream)

    def _send_headers(self, stream: _Stream) -> None:
        block, limit = stream.headers, self._peer_max_frame
        if len(block) <= limit:
            self._out.append(_frame(HEADERS, END_HEADERS, stream.sid, block))
            return
        self._out.append(_frame(HEADERS, 0, stream.sid, block[:limit]))
        for at in range(limit, len(block), limit):
            last = at + limit >= len(block)
            self._out.append(_frame(CONTINUATION, END_HEADERS if last else 0, stream.sid, block[at:at + limit]))

    def _send_body(self, stream: _Stream) -> bool:
        """Sends what the windows allow; True when the whole body (with END_STREAM) is out."""
        body = stream.body
        while len(body):
            n = min(len(body), self._send_window, stream.window, self._peer_max_frame)
            if n <= 0:
                stream.body = body
                if not stream.blocked:
                    stream.blocked = True
                    self._blocked.append(stream.sid)
                return False
            # header and a view of the body: the bytes are copied once, when data_to_send joins them
            self._out.append(_frame_header(DATA, END_STREAM if n == len(body) else 0, stream.sid, n))
            self._out.append(body[:n])
            self._send_window -= n
            stream.window -= n
            body = body[n:]
        stream.body = body
        return True

    def _flush_blocked(self) -> None:
        for _ in range(len(self._blocked)):
            sid = self._blocked.popleft()
            stream = self._streams.get(sid)
            if stream is None:
                continue
            stream.blocked = False
            if not self._send_body(stream) and self._send_window <= 0:
                return

    def cancel(self, call_id: int, status: str = "CANCELLED", details: str = "") -> Optional[CallResult]:
        """Ends a call from our side (a deadline): RST_STREAM(CANCEL); its late frames are dropped."""
        sid = self._sid_of.get(call_id)
        if sid is not None:
            self._finish(sid)
            self._out.append(_frame(RST_STREAM, 0, sid, struct.pack(">I", 8)))
            self._open_waiting()
            return CallResult(call_id, status, details)
        for i, (cid, _, _) in enumerate(self._waiting):  # not sent yet (past the stream limit)
            if cid == call_id:
                del self._waiting[i]
                return CallResult(call_id, status, details)
        return None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def active(self) -> int:
        """Calls started and not finished (on the wire or waiting for a stream)."""
        return len(self._streams) + len(self._waiting)

    # ---------------------------------------------------------------- receiving
    def receive(self, data: "bytes | memoryview") -> List[CallResult]:
        """Consumes received bytes; returns the calls they finished. Raises ProtocolError when the
        peer broke the protocol (after which ``fail_all`` gives every unfinished call its answer)."""
        buf = self._buf
        buf += data
        done: List[CallResult] = []
        pos, n = 0, len(buf)
        try:
            while n - pos >= 9:
                high, low, kind, flags, sid = _FRAME_HEADER.unpack_from(buf, pos)
                end = pos + 9 + (high << 16 | low)  # <= OUR_MAX_FRAME: 24 bits cannot say more
                if end > n:
                    break
                try:
                    self._frame_in(kind, flags, sid & 0x7FFFFFFF, bytes(buf[pos + 9:end]), done)
                except (struct.error, IndexError):  # a control frame shorter than its fixed fields
                    raise ProtocolError(f"malformed frame of type {kind}") from None
                pos = end
        finally:
            del buf[:pos]
        if self._consumed >= _REPLENISH_AT:
            self._out.append(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._consumed)))
            self._consumed = 0
        return done

    def _frame_in(self, kind: int, flags: int, sid: int, payload: bytes, done: List[CallResult]) -> None:
        if self._continuation is not None and kind != CONTINUATION:
            raise ProtocolError(f"frame type {kind} inside a header block")
        if kind == DATA:
            self._consumed += len(payload)
            stream = self._streams.get(sid)
            if flags & PADDED:
                payload = self._unpad(payload)
            if stream is not None:
                stream.received += payload
                if flags & END_STREAM:
                    self._end(stream, done)
        elif kind == HEADERS:
            if flags & PADDED:
                payload = self._unpad(payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers_in(sid, flags, payload, done)
            else:
                self._continuation = (sid, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self._continuation is None or self._continuation[0] != sid:
                raise ProtocolError("CONTINUATION without its HEADERS")
            self._continuation[2].extend(payload)
            if flags & END_HEADERS:
                first_sid, first_flags, block = self._continuation
                self._continuation = None
                self._headers_in(first_sid, first_flags, bytes(block), done)
        elif kind == RST_STREAM:
            if sid in self._streams:
                code = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else 2
                done.append(CallResult(self._finish(sid), _RST_STATUS.get(code, "INTERNAL"),
                                       f"stream reset by the server (HTTP/2 error {code})"))
                self._open_waiting()
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings_in(payload)
                self._out.append(_frame(SETTINGS, ACK, 0))
                # data under the new windows and stream limit only behind the ACK: gRPC's server checks a stream's
                # data against the initial window it knows we acknowledged, and resets a stream that overflows it
                # (PROTOCOL_ERROR), so DATA sent under a larger window ahead of the ACK would fail the call
                self._flush_blocked()
                self._open_waiting()
        elif kind == PING:
            if not flags & ACK:
                self._out.append(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            last_sid, code = struct.unpack(">II", payload[:8])
            last_sid &= 0x7FFFFFFF
            self.closed = f"the server is going away (GOAWAY, HTTP/2 error {code})"
            for stream_id in [s for s in self._streams if s > last_sid]:  # never processed by the server
                done.append(CallResult(self._finish(stream_id), "UNAVAILABLE", self.closed))
            done.extend(CallResult(cid, "UNAVAILABLE", self.closed) for cid, _, _ in self._waiting)  # never sent
            self._waiting.clear()
        elif kind == WINDOW_UPDATE:
            increment = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if sid == 0:
                self._send_window += increment
            elif sid in self._streams:
                self._streams[sid].window += increment
            self._flush_blocked()
        elif kind == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE with push disabled")
        # PRIORITY and unknown types are ignored (RFC 9113 5.5)

    @staticmethod
    def _unpad(payload: bytes) -> bytes:
        if not payload or payload[0] >= len(payload):
            raise ProtocolError("bad padding")
        return payload[1:len(payload) - payload[0]]

    def _settings_in(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError(f"SETTINGS of {len(payload)} bytes, not a multiple of 6")
        for at in range(0, len(payload), 6):
            key, value = struct.unpack(">HI", payload[at:at + 6])
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("initial window above 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= OUR_MAX_FRAME:
                    raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE {value} outside 16384..2^24-1")
                self._peer_max_frame = value
            elif key == S_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value

    def _headers_in(self, sid: int, flags: int, block: bytes, done: List[CallResult]) -> None:
        try:
            headers = self._decoder.decode(block)  # always: the dynamic table must see every block
        except HpackError as e:
            raise ProtocolError(f"bad header block: {e}") from None
        stream = self._streams.get(sid)
        if stream is None:
            return  # a call we cancelled
        for name, value in headers:
            if name == ":status":
                stream.http_status = value
            elif name == "grpc-status":
                stream.grpc_status = value
            elif name == "grpc-message":
                stream.details = unquote(value, errors="replace")
        if flags & END_STREAM:
            self._end(stream, done)

    def _end(self, stream: _Stream, done: List[CallResult]) -> None:
        status, details = _status_from_trailers(stream)
        message = b""
        if status is None:
            body = stream.received
            if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
                status, details = "INTERNAL", "the response is not one uncompressed gRPC message"
            else:
                message = bytes(body[5:])
        done.append(CallResult(self._finish(stream.sid), status, details, message))
        self._open_waiting()

    def _finish(self, sid: int) -> int:
        self._streams.pop(sid, None)
        call_id = self._call_of.pop(sid)
        del self._sid_of[call_id]
        return call_id

    def fail_all(self, status: str, details: str) -> List[CallResult]:
        """Ends every unfinished call (the connection is gone); the connection takes no more."""
        self.closed = self.closed or details
        out = [CallResult(self._call_of[sid], status, details) for sid in list(self._streams)]
        out += [CallResult(cid, status, details) for cid, _, _ in self._waiting]
        self._streams.clear()
        self._call_of.clear()
        self._sid_of.clear()
        self._waiting.clear()
        self._blocked.clear()
        return out
