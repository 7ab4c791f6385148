"""What the load generator's own client adds to one request's round trip (issue #6, concurrency 1).

    python -m bench.client_floor [--duration 3] [--url HOST:PORT --model M]

Without ``--url`` it starts ``bench.ceiling_server`` (answers at once, so the round trip is all client, network
stack and gRPC). With one request in flight it measures perf_analyzer, ``trtserve bench`` on its own HTTP/2 client
(``--transport h2``, threads and asyncio engines), and on gRPC's client (``--transport grpcio --engine threads``)
beside a bare blocking gRPC loop, those two in child processes under each GRPC_EXPERIMENTS setting (gRPC reads it
once, at import); several rounds interleaved. It prints the medians of requests/s, p50 and, for the bare loop,
client CPU and voluntary context switches per call: the thread hand-offs inside gRPC's client set its floor.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

from bench._server import ServerProcess
from bench.cpu import load_perf_analyzer, load_trtserve, perf_analyzer_path

VARIANTS = ("", "-event_engine_client")  # GRPC_EXPERIMENTS values; "" = gRPC's defaults

_LOOP_TEMPLATE = r"""
import json, resource, sys, time
import grpc
import numpy as np
from trtserve.protos import grpc_service_pb2 as pb
url, model, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
req = pb.ModelInferRequest(model_name=model)
req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
req.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
payload = req.SerializeToString()
__CALL__
for _ in range(300):
    call(payload)
lat = []
r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
while time.perf_counter() - t0 < seconds:
    s = time.perf_counter()
    call(payload)
    lat.append(time.perf_counter() - s)
dt, cpu, r1 = time.perf_counter() - t0, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF)
n = len(lat)
print(json.dumps({"rps": n / dt, "p50_ms": float(np.median(lat)) * 1e3, "cpu_us": cpu / n * 1e6,
                  "ctx_switches": (r1.ru_nvcsw - r0.ru_nvcsw) / n}))
"""

# how the loop makes its call: grpcio's blocking stub, or the generator's own HTTP/2 client (--transport h2)
_GRPC_CALL = """call = grpc.insecure_channel(url).unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                              request_serializer=None, response_deserializer=None)"""
_H2_CALL = """from trtserve.client.bench.h2sync import H2ThreadLoad
from trtserve.client.bench.h2target import H2Target
load = H2ThreadLoad(H2Target.from_url(url), payload, 1).__enter__()
def call(p):
    assert load.call(0) is None"""
_LOOP = _LOOP_TEMPLATE.replace("__CALL__", _GRPC_CALL)
_H2_LOOP = _LOOP_TEMPLATE.replace("__CALL__", _H2_CALL)


def _env(experiments: str) -> Dict[str, str]:
    """Set even when empty ("": gRPC's defaults), so ``trtserve bench`` leaves it as given."""
    return dict(os.environ, GRPC_EXPERIMENTS=experiments)


def bare_loop(url: str, model: str, seconds: float, experiments: str, h2: bool = False) -> dict:
    """A bare blocking loop in a child process: grpcio's stub, or (``h2``) the generator's own HTTP/2 client."""
    out = subprocess.run([sys.executable, "-c", _H2_LOOP if h2 else _LOOP, url, model, str(seconds)],
                         capture_output=True, text=True, env=_env(experiments), timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--url", help="an already running server (default: start bench.ceiling_server)")
    p.add_argument("--model", default="m")
    p.add_argument("--rounds", type=int, default=3, help="every client measured this many times, interleaved")
    a = p.parse_args(argv)
    pa = perf_analyzer_path()
    rows: List[tuple] = []

    def measure(url: str) -> None:
        for _ in range(a.rounds):  # interleaved, so a noisy neighbour hits every client alike
            if pa:
                r = load_perf_analyzer(pa, url, 1, a.duration, model=a.model)
                if r:
                    rows.append(("perf_analyzer", "-", r["rps"], r["p50_ms"], None, None))
            for exp in VARIANTS:
                r = bare_loop(url, a.model, a.duration, exp)
                rows.append(("bare grpc loop", exp or "default", r["rps"], r["p50_ms"], r["cpu_us"],
                             r["ctx_switches"]))
                b = load_trtserve(url, 1, a.duration, a.model, engine="threads", warmup_s=1.0, env=_env(exp),
                                  transport="grpcio")
                if b:
                    rows.append(("bench grpcio", exp or "default", b["rps"], b["p50_ms"], None, None))
            r = bare_loop(url, a.model, a.duration, "", h2=True)  # our own HTTP/2: gRPC's settings do not apply
            rows.append(("bare h2 loop", "-", r["rps"], r["p50_ms"], r["cpu_us"], r["ctx_switches"]))
            for engine in ("threads", "asyncio"):
                b = load_trtserve(url, 1, a.duration, a.model, engine=engine, warmup_s=1.0, transport="h2")
                if b:
                    rows.append((f"bench h2 {engine}", "-", b["rps"], b["p50_ms"], None, None))

    if a.url:
        measure(a.url)
    else:
        with ServerProcess(None, command=[sys.executable, "-m", "bench.ceiling_server", "--model", a.model,
                                          "--inputs", "64", "--outputs", "16"]) as s:
            measure(s.url)
    print(f"concurrency 1, {os.cpu_count()} CPU cores, grpcio {__import__('grpc').__version__}")
    print(f"medians of {a.rounds} rounds, {a.duration:g} s each")
    print(f"{'client':16} {'GRPC_EXPERIMENTS':22} {'req/s':>8} {'p50 ms':>7} {'cpu us/call':>11} {'ctx sw/call':>11}")
    for key in dict.fromkeys((tool, exp) for tool, exp, *_ in rows):
        mine = [r[2:] for r in rows if r[:2] == key]
        rps, p50, cpu, cs = (None if any(m[i] is None for m in mine) else statistics.median(m[i] for m in mine)
                             for i in range(4))
        print(f"{key[0]:16} {key[1]:22} {rps:8.0f} {p50:7.3f} {'' if cpu is None else f'{cpu:11.0f}'} "
              f"{'' if cs is None else f'{cs:11.2f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
