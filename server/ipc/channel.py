"""Links between a front end and the engine: batches of messages, one write per event-loop turn.

``SocketLink`` frames a pickled list of messages (4-byte length + pickle) over a non-blocking Unix
stream socket driven by the event loop's reader/writer callbacks; everything sent during one turn of the
loop goes out in one frame, and the receiver handles every frame it has in one callback. So under load
one wake-up carries many descriptors in each direction, and an idle link costs nothing (no polling).
``LocalLink`` is the same contract inside one process (``--frontends 0``): messages are handed over
on the next loop turn, without pickling.

The first frame a front end sends carries its arena's file descriptor (SCM_RIGHTS), see ``connect``.
"""
from __future__ import annotations

import array
import asyncio
import logging
import pickle
import socket
import struct
from typing import Any, Callable, List, Optional, Tuple

log = logging.getLogger("trtserve.ipc")

_HEADER = struct.Struct("<I")
_READ_CHUNK = 1 << 20
MAX_FRAME = 1 << 31  # a frame is a batch of descriptors; anything near this is a bug or a foreign peer

Handler = Callable[[List[tuple]], None]


def _ignore_messages(batch: List[tuple]) -> None:
    """A closed link's handler."""


def _nothing() -> None:
    """A closed link's close handler."""


class Link:
    """One end of a front end <-> engine connection."""

    closed = False

    def start(self, on_messages: Handler, on_closed: Callable[[], None]) -> None:
        raise NotImplementedError

    def send(self, message: tuple) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Sends what this turn queued now instead of at the end of the turn: for a sender that knows nothing else
        will join it (the engine, once a front end has no other request in flight), the turn saved is latency."""

    def close(self) -> None:
        raise NotImplementedError


class SocketLink(Link):
    """A link over a connected Unix stream socket, on the running event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._out: List[tuple] = []
        self._pending = bytearray()  # framed bytes the socket did not take yet
        self._inbuf = bytearray()
        self._chunk = memoryview(bytearray(_READ_CHUNK))
        self._flush_scheduled = False
        self._writing = False
        self._on_messages: Handler = _ignore_messages
        self._on_closed: Callable[[], None] = _nothing

    def start(self, on_messages: Handler, on_closed: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_messages, self._on_closed = on_messages, on_closed
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def send(self, message: tuple) -> None:
        if self.closed:
            return
        self._out.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        self._send_out()  # the flush already scheduled sends what is queued after this, or finds nothing

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._send_out()

    def _send_out(self) -> None:
        if self.closed or not self._out:
            return
        batch, self._out = self._out, []
        payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        self._pending += _HEADER.pack(len(payload))
        self._pending += payload
        self._write()

    def _write(self) -> None:
        while self._pending:
            try:
                n = self._sock.send(self._pending)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._lost()
                return
            del self._pending[:n]
        assert self._loop is not None
        if self._pending and not self._writing:
            self._writing = True
            self._loop.add_writer(self._sock.fileno(), self._write)
        elif not self._pending and self._writing:
            self._writing = False
            self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        # into one buffer kept for the link's life: recv(n) allocates n bytes per call (a fresh mapping at this
        # size) before it knows how few arrived, and under load most calls bring a small frame
        chunk = self._chunk
        while True:
            try:
                got = self._sock.recv_into(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                got = 0
            if not got:
                self._lost()
                return
            self._inbuf += chunk[:got]
            if got < _READ_CHUNK:
                break
        # every frame that arrived since the last read goes to the handler as one list: a busy receiver finds
        # several frames of one sender waiting, and handling them together is what lets the engine queue alike
        # requests as one entry (engine/group.py) across the sender's loop turns, not only within one
        messages: List[tuple] = []
        buf = self._inbuf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _HEADER.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            messages += pickle.loads(memoryview(buf)[pos + 4:pos + 4 + n])
            pos += 4 + n
        if pos:
            del buf[:pos]
        if messages:
            self._on_messages(messages)

    def _lost(self) -> None:
        if self.closed:
            return
        on_closed = self._on_closed
        self.close()
        on_closed()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._sock.fileno())
                if self._writing:
                    self._loop.remove_writer(self._sock.fileno())
            except (ValueError, RuntimeError):  # the loop is closing
                pass
        self._sock.close()
        # the handlers refer to the link's owner, which refers to the link (the engine's session of a front end): a
        # cycle that would keep the read buffer (a MiB) and the unread bytes until the cyclic collector runs, and a
        # settled heap (process/child.py) runs it seldom, so every front end that went away stayed in the engine
        self._on_messages, self._on_closed = _ignore_messages, _nothing
        self._chunk = memoryview(bytearray())
        self._inbuf = bytearray()
        self._pending = bytearray()
        self._out = []


class LocalLink(Link):
    """One end of an in-process pair: what one end sends, the other receives on the next loop turn."""

    def __init__(self) -> None:
        self.peer: Optional["LocalLink"] = None
        self._out: List[tuple] = []
        self._scheduled = False
        self._on_messages: Handler = lambda m: None
        self._on_closed: Callable[[], None] = lambda: None

    @classmethod
    def pair(cls) -> Tuple["LocalLink", "LocalLink"]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    def start(self, on_messages: Handler, on_closed: Callable[[], None]) -> None:
        self._on_messages, self._on_closed = on_messages, on_closed

    def send(self, message: tuple) -> None:
        if self.closed:
            return
        self._out.append(message)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        batch, self._out = self._out, []
        if batch and self.peer is not None and not self.peer.closed:
            self.peer._on_messages(batch)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.closed = True
            asyncio.get_running_loop().call_soon(peer._on_closed)


# ---- connecting a front end to the engine ---------------------------------------------------------------------

def engine_address(tag: str) -> str:
    """An abstract Unix socket name: it lives in the kernel only, so nothing is left on disk after a crash."""
    return "\0trtserve-engine-" + tag


def connect(address: str, hello: Any, fds: List[int], timeout: float = 10.0) -> socket.socket:
    """Blocking: connects to the engine and sends the hello frame with ``fds`` attached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    payload = pickle.dumps(hello)
    sock.sendmsg([_HEADER.pack(len(payload)) + payload],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    return sock


def receive_hello(sock: socket.socket, max_fds: int = 4, timeout: float = 5.0) -> Tuple[Any, List[int]]:
    """Blocking: reads the hello frame and its descriptors from a new connection."""
    sock.settimeout(timeout)
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_LEN(max_fds * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - (len(cdata) % fds.itemsize)])
    buf = bytearray(data)
    while len(buf) < 4 or len(buf) < 4 + _HEADER.unpack_from(buf)[0]:
        more = sock.recv(1 << 16)
        if not more:
            raise ConnectionError("the peer closed the connection during the hello")
        buf += more
    (n,) = _HEADER.unpack_from(buf)
    if len(buf) != 4 + n:
        raise ConnectionError("the peer sent more than the hello before it was answered")
    return pickle.loads(bytes(buf[4:4 + n])), list(fds)
