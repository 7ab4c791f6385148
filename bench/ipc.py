"""The front end <-> engine link alone, no model and no gRPC: what one descriptor costs to send and answer.

``python -m bench.ipc [--requests 200000] [--window 1,16,256]`` runs an echo peer in a second process (it
answers every INFER with a RESULT of the same shape a real answer has) and keeps ``window`` descriptors in
flight from this process. Prints descriptors/s, and the CPU per descriptor on each side: pickling, the
socket, the event-loop turns, everything the link adds. Small windows show the latency path (one frame per
message); large ones show what bulk frames save.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import sys
import time
from typing import List, Optional

from trtserve.server.ipc import messages as m
from trtserve.server.ipc.channel import SocketLink

DESCRIPTOR = ("mlp", "1", 1, (("INPUT0", "FP32", (1, 64), (m.ARENA, 4096, 256)),),
              (("OUTPUT0", None, (4352, 64)),), 1, 0, 0, None, 0, None)
ANSWER = (("OUTPUT0", "FP32", (1, 16), (m.ARENA, 4352, 64)),)


def _echo(sock: socket.socket) -> None:
    async def run() -> None:
        done = asyncio.get_running_loop().create_future()
        link = SocketLink(sock)

        def on(batch: List[tuple]) -> None:
            for msg in batch:
                link.send((m.RESULT, msg[1], "", "", ANSWER))

        link.start(on, lambda: done.done() or done.set_result(None))
        await done

    asyncio.run(run())


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _drive(sock: socket.socket, requests: int, window: int) -> float:
    link = SocketLink(sock)
    finished = asyncio.get_running_loop().create_future()
    state = {"sent": 0, "done": 0}

    def send() -> None:
        state["sent"] += 1
        link.send((m.INFER, state["sent"]) + DESCRIPTOR)

    def on(batch: List[tuple]) -> None:
        for _ in batch:
            state["done"] += 1
            if state["sent"] < requests:
                send()
        if state["done"] >= requests and not finished.done():
            finished.set_result(None)

    link.start(on, lambda: None)
    t0 = time.perf_counter()
    for _ in range(min(window, requests)):
        send()
    await finished
    elapsed = time.perf_counter() - t0
    link.close()
    return elapsed


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--window", default="1,16,256")
    a = p.parse_args(argv)
    print(f"{'window':>6} {'descriptors/s':>14} {'driver us/desc':>15} {'echo us/desc':>13}")
    ctx = multiprocessing.get_context("spawn")
    for window in (int(x) for x in a.window.split(",")):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        peer = ctx.Process(target=_echo, args=(theirs,), daemon=True)
        peer.start()
        theirs.close()
        n = a.requests if window > 1 else a.requests // 10
        c0 = _cpu()
        with open(f"/proc/{peer.pid}/stat") as f:
            p0 = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        elapsed = asyncio.run(_drive(ours, n, window))
        c1 = _cpu()
        with open(f"/proc/{peer.pid}/stat") as f:
            p1 = sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
        peer.join(10)
        tick = os.sysconf("SC_CLK_TCK")
        print(f"{window:>6} {n / elapsed:>14.0f} {1e6 * (c1 - c0) / n:>15.2f} {1e6 * (p1 - p0) / tick / n:>13.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
