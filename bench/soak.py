"""Soak: mixed valid / invalid / cancelled / deadline / streamed traffic against a ``trtserve serve``
child process on loopback, bounded by time and by request count; then the checks.

    python -m bench.soak --minutes 3 --max-requests 200000 [--concurrency 16] [--model-repository R]

At the end it checks, and prints the figures for:
- exactly-once answers: every unary call and every streamed request id got one answer (streams
  are counted per id, so a duplicate or a lost answer shows);
- correctness: every valid answer equals the NumPy reference of the example MLP
  (``trtserve.server.examples.make_mlp.reference``);
- expected statuses: invalid requests got INVALID_ARGUMENT/NOT_FOUND, nothing got INTERNAL/UNKNOWN;
- no growth of the server's RSS / threads / open file descriptors (read from /proc/<pid>) between
  the end of warm-up and the end of the run beyond the stated bounds.
Exit status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pathlib
import random
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import grpc
import numpy as np

from bench._server import ServerProcess
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.examples import REPOSITORY
from trtserve.server.examples.make_mlp import reference

RSS_BOUND = 64 * 2**20  # bytes of RSS growth allowed after warm-up
THREADS_BOUND = 4
FDS_BOUND = 8
KINDS = (("valid", 55), ("invalid", 15), ("cancel", 10), ("deadline", 10), ("stream", 10))


def _tree(pid: int) -> List[int]:
    """``pid`` and its descendants: the supervisor, its engine and its front ends."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return seen


def proc_figures(pid: int) -> Tuple[int, int, int]:
    """(RSS bytes, threads, open fds) of the server's whole process tree, from /proc."""
    rss = threads = fds = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (FileNotFoundError, ProcessLookupError):  # a process that ended between the listing and the read
            pass
    return rss, threads, fds


def _wrong(out: np.ndarray, x: np.ndarray) -> Optional[str]:
    """None when ``out`` is the model's answer to ``x``; else what the wrong output looks like, for the report: how
    many rows are off, how many of them are all zeros (memory dropped under it), and by how much."""
    want = reference(x)
    close = np.isclose(out, want, rtol=1e-4, atol=1e-4).all(axis=1)
    if close.all():
        return None
    bad_rows = np.flatnonzero(~close)
    zero_rows = sum(1 for i in bad_rows if not out[i].any())
    return f"{len(bad_rows)} of {len(out)} rows wrong, {zero_rows} of them all zeros, max error " \
           f"{float(np.max(np.abs(out - want))):.3g}"


def valid_request(rid: str, rng: random.Random) -> Tuple[pb.ModelInferRequest, np.ndarray]:
    rows = rng.randint(1, 8)
    x = np.random.default_rng(rng.getrandbits(32)).standard_normal((rows, 64)).astype(np.float32)
    r = pb.ModelInferRequest(model_name="mlp", id=rid)
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
    r.raw_input_contents.append(x.tobytes())
    return r, x


def invalid_request(rid: str, rng: random.Random) -> Tuple[pb.ModelInferRequest, Tuple[str, ...]]:
    """A malformed request and the statuses it may get."""
    r, x = valid_request(rid, rng)
    choice = rng.randrange(8)
    if choice == 0:
        r.inputs[0].datatype = "FP16"
    elif choice == 1:
        r.raw_input_contents[0] = r.raw_input_contents[0][:-rng.randint(1, 8)]
    elif choice == 2:
        r.inputs[0].shape[1] = 63
    elif choice == 3:
        r.model_name = rng.choice(["nope", "../mlp", "", "mlp/.."])
        return r, ("NOT_FOUND",)
    elif choice == 4:
        r.model_version = "7"
        return r, ("NOT_FOUND",)
    elif choice == 5:
        r.inputs[0].datatype = "BYTES"
        r.inputs[0].shape[:] = [1 << rng.randint(10, 30)]
        r.raw_input_contents[0] = b"\x05\x00\x00\x00ab"
    elif choice == 6:
        r.outputs.add(name="NOPE")
    else:
        r.parameters["priority"].string_param = "urgent"
    return r, ("INVALID_ARGUMENT",)


class Tally:
    def __init__(self) -> None:
        self.sent: Dict[str, int] = collections.Counter()
        self.ids: List[str] = []  # every request id sent
        self.answers: Dict[str, int] = collections.Counter()  # request id -> answers received
        self.codes: Dict[Tuple[str, str], int] = collections.Counter()  # (kind, status) -> count
        self.wrong: List[str] = []  # unexpected statuses or outputs
        self.checked_outputs = 0


async def _unary(stub, kind: str, rid: str, rng: random.Random, tally: Tally) -> None:
    expect: Tuple[str, ...] = ("OK",)
    x: Optional[np.ndarray] = None
    if kind == "invalid":
        req, expect = invalid_request(rid, rng)
    else:
        req, x = valid_request(rid, rng)
    timeout = rng.uniform(0.0002, 0.004) if kind == "deadline" else 30.0
    call = stub.ModelInfer(req, timeout=timeout)
    if kind == "cancel":
        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.002]))
        call.cancel()
        expect = ("OK", "CANCELLED")
    elif kind == "deadline":
        expect = ("OK", "DEADLINE_EXCEEDED")
    status = "OK"
    try:
        resp = await call
        if x is not None:
            out = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(x.shape[0], 16)
            how = _wrong(out, x)
            if resp.id != rid:
                tally.wrong.append(f"{rid}: answered with id {resp.id!r}")
            elif how is not None:
                tally.wrong.append(f"{rid}: wrong output ({how})")
            tally.checked_outputs += 1
    except asyncio.CancelledError:
        status = "CANCELLED"
    except grpc.aio.AioRpcError as e:
        status = e.code().name
    tally.answers[rid] += 1
    tally.codes[(kind, status)] += 1
    if status not in expect:
        tally.wrong.append(f"{rid} ({kind}): {status}")


class StreamWorker:
    """One long-lived ModelStreamInfer; requests written with ids, answers counted per id."""

    def __init__(self, stub, tally: Tally) -> None:
        self.call = stub.ModelStreamInfer()
        self.tally = tally
        self.inputs: Dict[str, Optional[np.ndarray]] = {}
        self.reader = asyncio.ensure_future(self._read())
        self.lock = asyncio.Lock()  # grpc.aio allows one write in progress per call

    async def send(self, rid: str, rng: random.Random) -> None:
        if rng.random() < 0.2:
            req, _ = invalid_request(rid, rng)
            self.inputs[rid] = None
        else:
            req, x = valid_request(rid, rng)
            self.inputs[rid] = x
        async with self.lock:
            await self.call.write(req)

    async def _read(self) -> None:
        async for msg in self.call:
            rid = msg.infer_response.id
            self.tally.answers[rid] += 1
            x = self.inputs.get(rid)
            if msg.error_message:
                code = msg.error_message.split("]")[0].lstrip("[")
                self.tally.codes[("stream", code)] += 1
                if x is not None or code not in ("INVALID_ARGUMENT", "NOT_FOUND"):
                    self.tally.wrong.append(f"{rid} (stream): {msg.error_message[:80]}")
            else:
                self.tally.codes[("stream", "OK")] += 1
                out = np.frombuffer(msg.infer_response.raw_output_contents[0], np.float32)
                if x is None or out.size != x.shape[0] * 16:
                    self.tally.wrong.append(f"{rid} (stream): unexpected output of {out.size} values")
                else:
                    how = _wrong(out.reshape(x.shape[0], 16), x)
                    if how is not None:
                        self.tally.wrong.append(f"{rid} (stream): wrong output ({how})")
                self.tally.checked_outputs += 1

    async def close(self) -> None:
        async with self.lock:
            await self.call.done_writing()
        await asyncio.wait_for(self.reader, 60)


async def drive(url: str, seconds: float, max_requests: int, concurrency: int, seed: int, tally: Tally,
                progress) -> float:
    rng = random.Random(seed)
    kinds = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    counter = iter(range(max_requests))
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        await stub.ServerReady(pb.ServerReadyRequest(), timeout=30)
        streams = [StreamWorker(stub, tally) for _ in range(2)]

        async def worker(w: int) -> None:
            wrng = random.Random(rng.getrandbits(32))
            for i in counter:
                if time.monotonic() - t0 >= seconds:
                    return
                kind = wrng.choices(kinds, weights)[0]
                rid = f"{w}-{i}"
                tally.sent[kind] += 1
                tally.ids.append(rid)
                if kind == "stream":
                    await streams[i % len(streams)].send(rid, wrng)
                    await asyncio.sleep(0)
                else:
                    await _unary(stub, kind, rid, wrng, tally)

        async def report() -> None:
            while True:
                await asyncio.sleep(30)
                progress(time.monotonic() - t0)

        reporter = asyncio.ensure_future(report())
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        for s in streams:
            await s.close()
        reporter.cancel()
    return time.monotonic() - t0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup-fraction", type=float, default=0.15, help="part of the run before the baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-repository", default=str(REPOSITORY), help="must serve the example 'mlp'")
    a = p.parse_args(argv)
    seconds = a.minutes * 60
    tally = Tally()
    with ServerProcess(pathlib.Path(a.model_repository), extra=["--drain-seconds", "5"]) as server:
        assert server.proc is not None
        pid = server.proc.pid
        drain = threading.Thread(target=lambda: server.proc.stdout.read(), daemon=True)  # type: ignore[union-attr]
        drain.start()  # the child's log must never fill its pipe
        samples: List[Tuple[float, int, int, int]] = []
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0,) + proc_figures(pid))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def progress(t: float) -> None:
            rss, th, fds = samples[-1][1:]
            print(f"  {t:6.0f} s: {sum(tally.sent.values())} sent, {sum(tally.answers.values())} answered, "
                  f"RSS {rss / 2**20:.1f} MiB, {th} threads, {fds} fds", flush=True)

        print(f"soak: server pid {pid} on {server.url}; {a.minutes} min or {a.max_requests} requests, "
              f"concurrency {a.concurrency}, mix {dict(KINDS)}", flush=True)
        wall = asyncio.run(drive(server.url, seconds, a.max_requests, a.concurrency, a.seed, tally, progress))
        time.sleep(2.0)  # let the server settle after the last answers
        stop.set()
        sampler.join()
        end = proc_figures(pid)
    warm = [s for s in samples if s[0] >= a.warmup_fraction * wall] or samples
    base = warm[0][1:]
    peak = tuple(max(s[i] for s in warm) for i in (1, 2, 3))
    sent = sum(tally.sent.values())
    lost = [rid for rid in tally.ids if tally.answers.get(rid, 0) == 0]
    dup = [rid for rid, n in tally.answers.items() if n > 1]
    unknown = set(tally.answers) - set(tally.ids)  # answers to ids never sent
    growth = (end[0] - base[0], end[1] - base[1], end[2] - base[2])
    ok = not lost and not dup and not unknown and not tally.wrong and growth[0] <= RSS_BOUND and growth[1] <= THREADS_BOUND \
        and growth[2] <= FDS_BOUND and sum(tally.answers.values()) == sent
    print(f"soak: {wall:.0f} s, {sent} requests ({sent / wall:.0f}/s): " +
          ", ".join(f"{k} {tally.sent[k]}" for k, _ in KINDS))
    print("  statuses: " + ", ".join(f"{k}/{s} {n}" for (k, s), n in sorted(tally.codes.items())))
    print(f"  answers: {sum(tally.answers.values())} for {sent} requests; lost {len(lost)}, duplicated {len(dup)}, "
          f"unknown ids {len(unknown)}; "
          f"valid outputs checked against the NumPy reference: {tally.checked_outputs}; "
          f"unexpected statuses/outputs: {len(tally.wrong)} {tally.wrong[:5]}")
    print(f"  server after warm-up -> end (peak): RSS {base[0] / 2**20:.1f} -> {end[0] / 2**20:.1f} MiB "
          f"({peak[0] / 2**20:.1f}), threads {base[1]} -> {end[1]} ({peak[1]}), fds {base[2]} -> {end[2]} ({peak[2]}); "
          f"bounds: RSS +{RSS_BOUND // 2**20} MiB, threads +{THREADS_BOUND}, fds +{FDS_BOUND}")
    print(f"soak: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
