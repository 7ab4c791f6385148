"""The front end <-> engine plumbing on its own: arena allocation, links, the hello with a descriptor."""
from __future__ import annotations

import asyncio
import gc
import os
import pickle
import socket
import threading
import weakref

import numpy as np
import pytest

from trtserve.server.ipc import channel
from trtserve.server.ipc.arena import ALIGN, SLICED_MAX, Allocator, Arena, ArenaFull
from trtserve.server.ipc.channel import LocalLink, SocketLink


def test_allocator_first_fit_merges_and_refuses_when_full():
    a = Allocator(1024)
    x = a.alloc(100)
    y = a.alloc(1)
    z = a.alloc(64)
    assert (x, y, z) == (0, 128, 192) and a.in_use == 128 + 64 + 64
    with pytest.raises(ArenaFull):
        a.alloc(1024 - 256 + 1)
    a.free(y)
    assert a.alloc(10) == 128  # the hole is reused
    a.free(128)
    a.free(x)
    a.free(z)
    assert a.blocks() == [(0, 1024)] and a.in_use == 0  # every neighbour merged back
    with pytest.raises(ValueError):
        a.alloc(2048)  # can never fit
    with pytest.raises(KeyError):
        a.free(64)  # not a block


def test_allocator_random_churn_keeps_blocks_disjoint_and_accounts_exactly():
    rng = np.random.default_rng(1)
    a = Allocator(1 << 16)
    live = {}
    for _ in range(4000):
        if live and rng.random() < 0.5:
            off = list(live)[int(rng.integers(len(live)))]
            a.free(off)
            del live[off]
        else:
            n = int(rng.integers(1, 3000))
            try:
                off = a.alloc(n)
            except ArenaFull:
                continue
            assert off % ALIGN == 0
            for o, size in live.items():
                assert off + n <= o or o + size <= off
            live[off] = n
    for off in list(live):
        a.free(off)
    assert a.blocks() == [(0, 1 << 16)]


def test_arena_is_shared_through_its_descriptor_and_bounds_checked():
    a = Arena.create(1 << 20)
    b = Arena.attach(os.dup(a.fd))
    try:
        a.view(4096, 8)[:] = np.arange(8, dtype=np.uint8)
        assert list(b.view(4096, 8)) == list(range(8))
        with pytest.raises(ValueError):
            b.view((1 << 20) - 4, 8)
        with pytest.raises(ValueError):
            b.view(-1, 8)
        assert not any(name.startswith("trtserve") for name in os.listdir("/dev/shm"))  # a memfd has no name
    finally:
        b.close()
        a.close()


async def _pair_roundtrip(n: int, payload: bytes):
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = SocketLink(left), SocketLink(right)
    got = []
    done = asyncio.get_running_loop().create_future()

    def on_b(batch):
        for msg in batch:
            b.send(("echo",) + msg)

    def on_a(batch):
        got.extend(batch)
        if len(got) == n and not done.done():
            done.set_result(None)

    closed = []
    a.start(on_a, lambda: closed.append("a"))
    b.start(on_b, lambda: closed.append("b"))
    for i in range(n):
        a.send((i, payload))
    await asyncio.wait_for(done, 30)
    b.close()
    await asyncio.sleep(0.05)
    return got, closed


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),  # contiguous: the memoryview copy
    np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],  # strided: through NumPy
    np.arange(6, dtype=np.float16).reshape(2, 3).T,  # Fortran order
    np.array(5, np.int64),  # 0-d
    np.zeros((0, 4), np.float16),  # empty
    np.array([True, False, True]),
], ids=["contiguous", "strided", "fortran", "scalar", "empty", "bool"])
def test_arena_write_lands_the_bytes_another_mapping_reads(array):
    arena = Arena.create(1 << 16)
    other = Arena.attach(os.dup(arena.fd))
    try:
        arena.write(192, array)
        got = other.view(192, array.nbytes).view(array.dtype).reshape(array.shape)
        np.testing.assert_array_equal(got, array)
        with pytest.raises(ValueError, match="outside the arena"):
            arena.write(arena.size - 1, np.zeros(2, np.uint8))
        with pytest.raises(ValueError, match="outside the arena"):
            arena.write(-8, np.zeros(2, np.uint8))
    finally:
        other.close()
        arena.close()
    with pytest.raises(ValueError):
        arena.write(0, np.zeros(1, np.uint8))  # closed


def test_arena_array_is_a_read_only_bounds_checked_view_that_outlives_close():
    arena = Arena.create(1 << 16)
    arena.write(128, np.arange(8, dtype=np.float32))
    x = arena.array(128, np.dtype("<f4"), (2, 4))
    assert not x.flags.writeable and x.shape == (2, 4)
    np.testing.assert_array_equal(x.reshape(-1), np.arange(8, dtype=np.float32))
    assert arena.array(128, np.dtype("<f4"), (0, 4)).shape == (0, 4)
    assert arena.array(128, np.dtype("<i8"), ()).shape == ()
    with pytest.raises(ValueError, match="outside the arena"):
        arena.array(arena.size - 8, np.dtype("<f4"), (4,))
    arena.write(258, np.arange(3, dtype=np.float32))  # not item-aligned: served all the same
    np.testing.assert_array_equal(arena.array(258, np.dtype("<f4"), (3,)), np.arange(3, dtype=np.float32))
    y = arena.array(128, np.dtype("<f4"), (8,))
    arena.close()  # the engine closes a detached front end's arena while a batch may still read an input
    np.testing.assert_array_equal(x.reshape(-1), np.arange(8, dtype=np.float32))  # still mapped, no crash
    np.testing.assert_array_equal(y, np.arange(8, dtype=np.float32))
    with pytest.raises(ValueError, match="closed"):
        arena.array(128, np.dtype("<f4"), (8,))


def test_socket_link_keeps_order_carries_large_frames_and_reports_the_peer_closing():
    big = os.urandom(3 << 20)  # larger than one read and than the socket buffer: partial writes and reads
    got, closed = asyncio.run(_pair_roundtrip(5, big))
    assert [m[1] for m in got] == list(range(5)) and all(m[2] == big for m in got)
    assert closed == ["a"]  # a learns that b went away
    got, _ = asyncio.run(_pair_roundtrip(20000, b"x"))  # many small messages, batched per loop turn
    assert [m[1] for m in got] == list(range(20000))


def test_socket_link_flush_sends_now_and_what_follows_in_the_turn_still_goes_once():
    async def run():
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        right.setblocking(False)
        a = SocketLink(left)
        a.start(lambda batch: None, lambda: None)
        a.send((1,))
        with pytest.raises(BlockingIOError):
            right.recv(1 << 16)  # queued for the end of the turn
        a.flush()
        first = right.recv(1 << 16)  # on the wire before the turn ends
        a.send((2,))  # after a flush in the same turn: the flush already scheduled sends it
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        rest = right.recv(1 << 16)
        a.close()
        right.close()
        return first, rest

    first, rest = asyncio.run(run())
    frames = []
    for data in (first, rest):
        while data:
            n = int.from_bytes(data[:4], "little")
            frames.append(pickle.loads(data[4:4 + n]))
            data = data[4 + n:]
    assert frames == [[(1,)], [(2,)]]


class _Owner:
    """What owns a link and is referred to by its handlers, as the engine's session of a front end is."""

    def __init__(self, link: SocketLink) -> None:
        self.link = link
        self.seen: list = []
        link.start(lambda batch: self.seen.extend(batch), self.gone)

    def gone(self) -> None:
        self.seen.append("gone")


def test_a_link_that_closes_lets_its_owner_go_without_the_cyclic_collector():
    """A front end that went away is freed at once, its read buffer with it: the engine runs the cyclic collector
    seldom (process/child.py), and before this every restarted front end left a MiB behind in it."""
    async def run(end: str) -> tuple:
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        owner = _Owner(SocketLink(left))
        peer = SocketLink(right)
        peer.start(lambda batch: None, lambda: None)
        peer.send((1, b"x" * 1000))
        await asyncio.sleep(0.05)
        if end == "peer":  # the front end's process died: the engine's side learns it from the socket
            peer.close()
            await asyncio.sleep(0.05)
        else:
            owner.link.close()
            peer.close()
        seen = list(owner.seen)
        ref = weakref.ref(owner)
        del owner
        return seen, ref() is None

    gc.disable()
    try:
        assert asyncio.run(run("peer")) == ([(1, b"x" * 1000), "gone"], True)
        assert asyncio.run(run("owner")) == ([(1, b"x" * 1000)], True)
    finally:
        gc.enable()


def test_local_link_delivers_on_the_next_turn_and_closes_both_ends():
    async def run():
        a, b = LocalLink.pair()
        seen, closed = [], []
        a.start(lambda batch: None, lambda: closed.append("a"))
        b.start(lambda batch: seen.append(list(batch)), lambda: closed.append("b"))
        a.send((1,))
        a.send((2,))
        assert seen == []  # not synchronously
        await asyncio.sleep(0)
        assert seen == [[(1,), (2,)]]  # one batch
        a.close()
        await asyncio.sleep(0)
        return closed, b.closed

    closed, b_closed = asyncio.run(run())
    assert closed == ["b"] and b_closed


def test_hello_carries_the_arena_descriptor():
    address = channel.engine_address(f"test-{os.getpid()}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(1)
    arena = Arena.create(1 << 16)
    arena.view(0, 4)[:] = [1, 2, 3, 4]
    result = {}

    def accept():
        conn, _ = server.accept()
        result["hello"], result["fds"] = channel.receive_hello(conn)
        conn.close()

    t = threading.Thread(target=accept)
    t.start()
    sock = channel.connect(address, {"name": "fe-0"}, [arena.fd])
    t.join(10)
    sock.close()
    server.close()
    assert result["hello"] == {"name": "fe-0"} and len(result["fds"]) == 1
    other = Arena.attach(result["fds"][0])
    assert list(other.view(0, 4)) == [1, 2, 3, 4]
    other.close()
    arena.close()


@pytest.mark.parametrize("count", [4, SLICED_MAX + 8])  # copied slice by slice, and in one indexed copy
@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("dims", [(1, 64), (2, 16), (1, 3), (3, 5)])
def test_arena_gather_and_scatter_move_many_pieces_in_one_copy_and_are_bounds_checked(dims, as_list, count):
    arena = Arena.create(1 << 18)
    other = Arena.attach(os.dup(arena.fd))
    try:
        rng = np.random.default_rng(7)
        nbytes = 4 * int(np.prod(dims))
        step = (nbytes + 63) // 64 * 64
        offsets = rng.permutation(2 * count)[:count].astype(np.int64) * step  # out of order, some apart
        pieces = rng.standard_normal((len(offsets),) + dims).astype(np.float32)
        for off, piece in zip(offsets, pieces):
            other.write(int(off), piece)
        got = arena.gather(offsets.tolist() if as_list else offsets, np.dtype(np.float32), dims)
        np.testing.assert_array_equal(got, pieces.reshape((-1,) + dims[1:]))
        out = offsets + 2 * count * step
        arena.scatter(out.tolist() if as_list else out, 3 * pieces)
        for off, piece in zip(out, pieces):
            np.testing.assert_array_equal(other.array(int(off), np.dtype(np.float32), dims), 3 * piece)
        with pytest.raises(ValueError, match="outside the arena"):
            arena.gather(np.array([0, arena.size - nbytes + 1], np.int64), np.dtype(np.float32), dims)
        with pytest.raises(ValueError, match="outside the arena"):
            arena.scatter(np.array([-64], np.int64), pieces[:1])
        with pytest.raises(ValueError, match="outside the arena"):  # one bad offset among this many
            arena.gather(np.append(offsets[1:], arena.size - nbytes + 1), np.dtype(np.float32), dims)
        with pytest.raises(ValueError, match="outside the arena"):
            arena.scatter(np.append(out[1:], -64), 3 * pieces)
    finally:
        other.close()
        arena.close()
