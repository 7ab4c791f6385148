"""The engine process alone: descriptors fed from a driver process, no gRPC (issue 17's engine goals).

``python -m bench.engine_alone --model-repository R --model m --rows 1 --concurrency 1,32,256 --duration 3``
starts the real engine process (server/engine/process.py) on R, connects a driver to it the way a front
end does (an arena of its own, handed over with the hello; ``--links N``: N such links, as N front ends would,
``--frames-of-one``: each descriptor in a frame of its own), keeps C requests in flight (each its own arena
block, written once: the driver does no per-request copying) and prints, per level, requests/s, rows/s,
p50/p99 of the descriptor round trip, the mean formed batch (from the engine's statistics), and the CPU
the engine process used per request. ``--inputs NAME:DTYPE:DIMS`` describes the model's inputs (the batch
dimension is added); the default is the example MLP's INPUT0 FP32 [64].
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Optional, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.ipc import channel
from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import Allocator, Arena, aligned
from trtserve.server.ipc.channel import SocketLink
from trtserve.server.options import ServerOptions
from trtserve.server.process import loops


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Driver:
    """A front end without gRPC: C requests in flight, each re-sent as soon as it is answered."""

    def __init__(self, address: str, spec, serial: int, inputs: List[Tuple[str, str, Tuple[int, ...]]],
                 rows: int, concurrency: int, frames_of_one: bool = False, deadline_s: Optional[float] = None) -> None:
        self.spec, self.serial, self.rows = spec, serial, rows
        self.deadline_s = deadline_s  # each request's deadline, from when it is sent, as a client's gRPC timeout
        # each descriptor in a frame of its own, as a front end whose loop turns each take one gRPC call sends them
        self.frames_of_one = frames_of_one
        self.arena = Arena.create(max(64 << 20, concurrency * 4 * _request_bytes(spec, inputs, rows)))
        self.alloc = Allocator(self.arena.size)
        sock = channel.connect(address, {"name": "bench-driver", "pid": os.getpid()}, [self.arena.fd])
        self.link = SocketLink(sock)
        self.concurrency = concurrency
        self.templates = []  # per slot: the INFER message body (inputs written once)
        rng = np.random.default_rng(0)
        for _ in range(concurrency):
            descs = []
            for name, wire, dims in inputs:
                dt = dtypes.BY_WIRE[wire]
                shape = (rows,) + tuple(dims)
                data = (rng.standard_normal(shape) if dt.numpy.kind == "f" else rng.integers(0, 100, shape)
                        ).astype(dt.numpy)
                off = self.alloc.alloc(data.nbytes)
                self.arena.view(off, data.nbytes)[:] = data.reshape(-1).view(np.uint8)
                descs.append((name, wire, shape, (m.ARENA, off, data.nbytes)))
            outs = []
            for t in spec.outputs:
                n = dtypes.BY_WIRE[t.datatype].itemsize * rows * int(np.prod(t.dims))
                outs.append((t.name, None, (self.alloc.alloc(n), n)))
            self.templates.append((tuple(descs), tuple(outs)))
        self.sent: Dict[int, Tuple[int, float]] = {}
        self.latencies: List[float] = []
        self.done = 0
        self.errors = 0
        self._ids = 0
        self.recording = False
        self.stopping = False

    def _send(self, slot: int) -> None:
        self._ids += 1
        inputs, outputs = self.templates[slot]
        self.sent[self._ids] = (slot, time.perf_counter())
        self.link.send((m.INFER, self._ids, self.spec.name, self.spec.version, self.serial, inputs, outputs,
                        self.rows, 0, 0, None if self.deadline_s is None else time.monotonic() + self.deadline_s,
                        time.monotonic_ns(), None))
        if self.frames_of_one:
            self.link._flush()  # the frame goes now, before the next descriptor joins it

    def _on(self, batch: List[tuple]) -> None:
        now = time.perf_counter()
        for msg in batch:
            if msg[0] == m.RESULTS:  # a group's answers (server/engine/group.py): every one a success
                answers = [(req_id, "", "") for req_id in msg[1]]
            elif msg[0] == m.RESULT:
                answers = [(msg[1], msg[2], msg[3])]
            else:
                continue
            for req_id, code, message in answers:
                slot, t0 = self.sent.pop(req_id)
                if code:
                    self.errors += 1
                    if self.errors < 3:
                        print("error:", code, message, file=sys.stderr)
                if self.recording:
                    self.done += 1
                    self.latencies.append(now - t0)
                if not self.stopping:
                    self._send(slot)

    async def run(self, warmup: float, duration: float) -> float:
        """Keeps the requests going; returns the measured window's length (``_combined`` makes the row)."""
        self.link.start(self._on, lambda: None)
        for slot in range(self.concurrency):
            self._send(slot)
        await asyncio.sleep(warmup)
        self.recording = True
        t0 = time.perf_counter()
        await asyncio.sleep(duration)
        self.recording = False
        self.stopping = True
        wall = time.perf_counter() - t0
        while self.sent:  # let the last ones come back before the next level
            await asyncio.sleep(0.01)
        self.link.close()
        return wall


def _request_bytes(spec, inputs, rows: int) -> int:
    total = 0
    for _name, wire, dims in inputs:
        total += aligned(dtypes.BY_WIRE[wire].itemsize * rows * int(np.prod(dims)))
    for t in spec.outputs:
        total += aligned(dtypes.BY_WIRE[t.datatype].itemsize * rows * int(np.prod(t.dims)))
    return total


class Engine:
    """The real engine process on a repository."""

    def __init__(self, repo: pathlib.Path, cpus: Optional[str], cache_dir: Optional[pathlib.Path] = None,
                 switch_interval: Optional[float] = None, module: str = "trtserve.server.engine.process",
                 env: Optional[Dict[str, str]] = None, script: Optional[List[str]] = None,
                 event_loop: str = "auto") -> None:
        """``script``: the engine's program and arguments in place of ``-m module`` (a stand-in backend's);
        ``event_loop``: as ``trtserve serve --event-loop`` (auto: uvloop where installed, as serve takes it)."""
        self.address = channel.engine_address(f"bench-{uuid.uuid4().hex[:8]}")
        options = ServerOptions(model_repository=repo, metrics_port=None, gpu_metrics=False, cache_dir=cache_dir)
        options.event_loop = self.event_loop = loops.resolve(event_loop)
        cmd = [sys.executable] + (script or ["-m", module])
        if cpus:
            cmd = ["taskset", "-c", cpus] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, **env} if env else None)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(pickle.dumps({"role": "engine", "index": 0, "options": options,
                                            "address": self.address, "parent_pid": os.getpid(),
                                            "log_level": 30,
                                            "switch_interval": switch_interval or sys.getswitchinterval()}))
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the engine process did not start")
        json.loads(line)

    async def call(self, method: str, *args):
        """One control call on a connection of its own."""
        arena = Arena.create(1 << 16)
        link = SocketLink(channel.connect(self.address, {"name": "bench-control"}, [arena.fd]))
        fut = asyncio.get_running_loop().create_future()
        def on_batch(batch) -> None:  # the engine may send SETTINGS first (log and trace settings)
            for msg in batch:
                if msg[0] == m.REPLY and not fut.done():
                    fut.set_result(msg)

        link.start(on_batch, lambda: None)
        link.send((m.CALL, 1, method, args))
        reply = await fut
        link.close()
        arena.close()
        if reply[2]:
            raise SystemExit(f"{method}: {reply[2]} {reply[3]}")
        return reply[4]

    def cpu(self) -> float:
        return _cpu_s(self.proc.pid)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _parse_inputs(specs: List[str]) -> List[Tuple[str, str, Tuple[int, ...]]]:
    out = []
    for s in specs:
        name, wire, dims = s.split(":")
        out.append((name, wire, tuple(int(d) for d in dims.split(","))))
    return out


async def _level(engine: Engine, model: str, inputs, rows: int, concurrency: int, warmup: float,
                 duration: float, links: int = 1, frames_of_one: bool = False,
                 window_signals: bool = False, deadline_s: Optional[float] = None) -> Dict[str, float]:
    """One level; ``window_signals``: SIGUSR1 to the engine as the measured window starts, SIGUSR2 as it ends
    (bench/engine_cprofile.py profiles between them); ``deadline_s``: each request's deadline."""
    spec, serial = await engine.call("model_info", model, "")
    stats0 = pb.ModelStatisticsResponse.FromString(await engine.call("model_statistics", model, ""))
    shares = [concurrency // links + (1 if i < concurrency % links else 0) for i in range(links)]
    drivers = [Driver(engine.address, spec, serial, inputs, rows, c, frames_of_one, deadline_s) for c in shares if c]
    run = asyncio.ensure_future(asyncio.gather(*(d.run(warmup, duration) for d in drivers)))
    await asyncio.sleep(warmup)
    if window_signals:
        engine.signal(signal.SIGUSR1)
        w0 = pb.ModelStatisticsResponse.FromString(await engine.call("model_statistics", model, ""))
    c_start, d_start = engine.cpu(), time.process_time()
    result = _combined(await run, drivers, rows)
    c_end, d_end = engine.cpu(), time.process_time()
    if window_signals:
        engine.signal(signal.SIGUSR2)
        w1 = pb.ModelStatisticsResponse.FromString(await engine.call("model_statistics", model, ""))
        result["window_batches"] = w1.model_stats[0].execution_count - w0.model_stats[0].execution_count
    stats1 = pb.ModelStatisticsResponse.FromString(await engine.call("model_statistics", model, ""))
    a, b = stats0.model_stats[0], stats1.model_stats[0]
    rows_done = b.inference_count - a.inference_count
    execs = b.execution_count - a.execution_count
    result["mean_batch"] = rows_done / execs if execs else 0.0
    # where a request's time went inside the engine, per successful request (Triton's cumulative statistics):
    # queued until its batch started on an instance, then the batch's input, infer and output phases
    ok = b.inference_stats.success.count - a.inference_stats.success.count
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        ns = getattr(b.inference_stats, key).ns - getattr(a.inference_stats, key).ns
        result[f"{key}_us"] = ns / ok / 1e3 if ok else 0.0
    result["engine_cores"] = (c_end - c_start) / result["wall"]
    result["engine_us_per_req"] = 1e6 * (c_end - c_start) / max(1, sum(d.done for d in drivers))
    # the driver is one Python process: near one core, it and not the engine may be what limits the rate
    result["driver_cores"] = (d_end - d_start) / result["wall"]
    return result


def _combined(walls: List[float], drivers: List["Driver"], rows: int) -> Dict[str, float]:
    """One row for all the links: rates added up, latency percentiles over every request."""
    wall = max(walls)
    done = sum(d.done for d in drivers)
    lat = np.array([x for d in drivers for x in d.latencies]) * 1e3 if done else np.zeros(1)
    return {"req_s": done / wall, "rows_s": done * rows / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": sum(d.errors for d in drivers), "wall": wall}


def _phases(r: Dict[str, float]) -> str:
    """queue/compute input/infer/output in us per request, as one cell."""
    return "/".join(f"{r[k + '_us']:.0f}" for k in ("queue", "compute_input", "compute_infer", "compute_output"))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=pathlib.Path, default=None,
                   help="default: the bundled example repository (model mlp)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--inputs", nargs="*", default=["INPUT0:FP32:64"], help="NAME:DTYPE:DIMS (batch dim added)")
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--concurrency", default="1,32,256")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--engine-cpus", default=None, help="taskset CPU list for the engine process")
    p.add_argument("--links", type=int, default=1,
                   help="links to the engine, each with its own arena and a share of the requests in flight (as many "
                        "front ends would)")
    p.add_argument("--frames-of-one", action="store_true",
                   help="one descriptor per frame (a front end sends what one loop turn brought, often one request)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="every request with this deadline (seconds from when it is sent), as clients' gRPC timeouts")
    p.add_argument("--json", type=pathlib.Path, default=None)
    a = p.parse_args(argv)
    from trtserve.server.examples import REPOSITORY

    repo = (a.model_repository or REPOSITORY).resolve()
    engine = Engine(repo, a.engine_cpus)
    rows_out = []
    try:
        print(f"engine alone: model {a.model}, {a.rows} row(s) per request, {a.links} link(s), repository {repo}")
        print(f"{'concurrency':>11} {'req/s':>10} {'rows/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'batch':>7} "
              f"{'engine cores':>12} {'engine us/req':>13} {'driver cores':>12} {'queue/in/infer/out us':>24} "
              f"{'errors':>6}", flush=True)
        for level in [int(x) for x in a.concurrency.split(",")]:
            r = asyncio.run(_level(engine, a.model, _parse_inputs(a.inputs), a.rows, level, a.warmup, a.duration,
                                   a.links, a.frames_of_one, deadline_s=a.deadline_s))
            r["concurrency"] = level
            rows_out.append(r)
            print(f"{level:>11} {r['req_s']:>10.0f} {r['rows_s']:>12.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                  f"{r['mean_batch']:>7.1f} {r['engine_cores']:>12.2f} {r['engine_us_per_req']:>13.1f} "
                  f"{r['driver_cores']:>12.2f} "
                  f"{_phases(r):>24} {r['errors']:>6}", flush=True)
    finally:
        engine.stop()
    if a.json:
        a.json.write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
