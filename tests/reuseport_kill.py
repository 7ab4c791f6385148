"""Front ends going away under clients, in a private network namespace with ``net.ipv4.tcp_migrate_req`` set as
asked (tests/test_frontends.py runs this as a script; it needs the right to create a network namespace, and exits 3
without it). Prints one JSON line.

    python -m tests.reuseport_kill 0|1           # kill: a front end killed with connections queued at it
    python -m tests.reuseport_kill 1 replace     # replace: front ends replaced for their memory under load

kill: the victim is stopped (SIGSTOP) first, so that new connections the kernel hands to its listener stay queued
there, as those of clients reconnecting just as a front end dies do; then it is killed. Prints how many calls were
answered before the kill, each call's outcome, and whether the server warned about the setting.

replace: a supervisor whose memory limit is below a new front end's size replaces its two front ends in turn while
eight connections keep calling, until two replacements are done (a minute at most); prints the replacements, the
restarts (crashes) and the calls' outcomes.
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import sys
from typing import List

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CONNECTIONS = 16


def private_network(migrate: str) -> bool:
    """This process in a network namespace of its own, loopback up, the sysctl set; False if not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
            f.write(migrate)
    except OSError:
        return False
    return True


async def calls(url: str, victim: int) -> dict:
    import grpc

    from tests.test_frontends import ONE_CONNECTION, mlp_request
    from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

    async def one(i: int) -> str:
        async with grpc.aio.insecure_channel(url, options=ONE_CONNECTION) as ch:
            try:  # no wait_for_ready, as clients call by default: a reset connection fails the call
                await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(mlp_request(float(i)), timeout=20)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"

    tasks: List["asyncio.Future[str]"] = [asyncio.ensure_future(one(i)) for i in range(CONNECTIONS)]
    await asyncio.sleep(1.0)  # the other front end answers its share meanwhile
    before = sum(t.done() for t in tasks)
    os.kill(victim, signal.SIGKILL)
    return {"before": before, "outcomes": await asyncio.gather(*tasks)}


async def replacements(seconds: float) -> dict:
    import collections

    import grpc

    from tests.test_frontends import ONE_CONNECTION, frontend_starts, mlp_request
    from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
    from trtserve.server.examples import REPOSITORY
    from trtserve.server.options import ServerOptions
    from trtserve.server.supervisor import Supervisor

    sup = Supervisor(ServerOptions(model_repository=REPOSITORY, grpc_port=0, http_port=None, metrics_port=0,
                                   gpu_metrics=False, frontends=2, drain_seconds=5.0,
                                   frontend_max_memory_bytes=1 << 20, frontend_memory_check_s=0.2,
                                   frontend_min_age_s=1.5))
    port, metrics_port = await sup.start()
    first = sorted(sup.pids().values())
    outcomes: "collections.Counter[str]" = collections.Counter()
    done = asyncio.Event()

    async def connection() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=ONE_CONNECTION) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            while not done.is_set():
                try:
                    await stub.ModelInfer(mlp_request(1.0), timeout=10)
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    outcomes[e.code().name] += 1

    calls = [asyncio.ensure_future(connection()) for _ in range(8)]
    started = asyncio.get_running_loop().time()
    while sup.replacements < 2 and asyncio.get_running_loop().time() - started < seconds:  # both, once at least
        await asyncio.sleep(0.2)
    done.set()
    await asyncio.gather(*calls)
    result = {"replacements": sup.replacements, "restarts": sup.restarts, "outcomes": dict(outcomes),
              "new_pids": len(set(sup.pids().values()) - set(first)),
              "starts": await asyncio.get_running_loop().run_in_executor(None, frontend_starts, metrics_port)}
    await sup.stop(2.0)
    result["exit_code"] = await sup.wait()
    return result


def main() -> int:
    if not private_network(sys.argv[1]):
        return 3
    if sys.argv[2:] == ["replace"]:
        print(json.dumps(asyncio.run(replacements(60.0))))
        return 0
    from tests.mp import Serve
    from trtserve.server.examples import REPOSITORY

    s = Serve(REPOSITORY, frontends=2)
    try:
        victim = s.roles()["frontend"][0]
        os.kill(victim, signal.SIGSTOP)
        result = asyncio.run(calls(s.url, victim))
    finally:
        code = s.stop()
    result["warned"] = "tcp_migrate_req is 0" in s.output()
    result["exit_code"] = code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
