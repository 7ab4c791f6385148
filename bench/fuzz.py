"""Long fuzz run: the properties of tests/test_fuzz_properties.py with far more examples, plus a
wire property that sends generated requests to a ``trtserve serve`` child process on loopback.

    python -m bench.fuzz --minutes 5 [--no-wire] [--chunk 2000]

Each property runs in rounds (fresh random examples each round, no example database) until its
share of the time is spent; the inputs tried are counted by wrapping the test body. A failure
("crash") is recorded with hypothesis's shrunk example and the run goes on. The wire property
accepts only OK / INVALID_ARGUMENT / NOT_FOUND for any generated request and checks at the end
that the server still answers a valid request correctly. Exit status 1 if anything crashed.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench._server import ServerProcess
from tests import test_fuzz_properties as props
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.examples import REPOSITORY
from trtserve.server.examples.make_mlp import reference


def properties() -> List[str]:
    """Every hypothesis property of tests/test_fuzz_properties.py, found there (a list kept here went stale when a
    property was renamed)."""
    return sorted(name for name, obj in vars(props).items()
                  if name.startswith("test_") and callable(obj) and hasattr(obj, "hypothesis"))


ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}


@st.composite
def near_valid(draw):
    """Requests for the example mlp that are right in form: any float bits, any row count."""
    rows = draw(st.integers(0, 40))
    r = pb.ModelInferRequest(model_name="mlp", id=draw(st.text(max_size=8)))
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
    r.raw_input_contents.append(draw(st.binary(min_size=rows * 256, max_size=rows * 256)))
    if draw(st.booleans()):
        r.outputs.add(name=draw(st.sampled_from(["OUTPUT0", "OUTPUT1", ""])))
    return r


def wire_property(stub, seen: Dict[str, int]) -> Callable:
    @given(st.one_of(props.infer_requests(), near_valid()), st.sampled_from(["mlp", "mlp", "", "../mlp"]))
    def test_wire(request, model):
        if request.model_name == "m":
            request.model_name = model
        try:
            stub.ModelInfer(request, timeout=10)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            assert code in ALLOWED, f"{code}: {e.details()[:200]}"
        seen[code] = seen.get(code, 0) + 1

    return test_wire


def run(test: Callable, budget_s: float, chunk: int) -> Tuple[int, List[str]]:
    """Runs a @given test in rounds until ``budget_s``; returns (inputs tried, crash reports)."""
    count = [0]
    inner = test.hypothesis.inner_test  # type: ignore[attr-defined]

    def counting(*a, **k):
        count[0] += 1
        return inner(*a, **k)

    test.hypothesis.inner_test = counting  # type: ignore[attr-defined]
    crashes: List[str] = []
    # a @given test takes one settings decorator; hypothesis reads it from this attribute at call time
    previous = getattr(test, "_hypothesis_internal_use_settings", None)
    test._hypothesis_internal_use_settings = settings(  # type: ignore[attr-defined]
        max_examples=chunk, deadline=None, database=None, derandomize=False,
        suppress_health_check=list(HealthCheck), print_blob=True)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < budget_s:
            try:
                test()
            except Exception as e:  # a falsified property: keep the shrunk example, go on
                crashes.append("".join(traceback.format_exception_only(type(e), e)).strip()[:2000])
    finally:
        test.hypothesis.inner_test = inner  # type: ignore[attr-defined]
        if previous is not None:
            test._hypothesis_internal_use_settings = previous  # type: ignore[attr-defined]
    return count[0], crashes


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--chunk", type=int, default=2000, help="examples per round")
    p.add_argument("--no-wire", action="store_true", help="skip the live-server property")
    a = p.parse_args(argv)
    names = properties() + ([] if a.no_wire else ["wire"])
    budget = a.minutes * 60 / len(names)
    results: Dict[str, Tuple[int, List[str], float]] = {}
    seen: Dict[str, int] = {}
    server: Optional[ServerProcess] = None
    try:
        if not a.no_wire:
            server = ServerProcess(pathlib.Path(REPOSITORY)).__enter__()
            import threading

            threading.Thread(target=lambda: server.proc.stdout.read(), daemon=True).start()  # type: ignore
            channel = grpc.insecure_channel(server.url)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in names:
            t0 = time.monotonic()
            test = wire_property(stub, seen) if name == "wire" else getattr(props, name)
            tried, crashes = run(test, budget, a.chunk if name != "wire" else max(50, a.chunk // 10))
            results[name] = (tried, crashes, time.monotonic() - t0)
            print(f"{name}: {tried} inputs in {results[name][2]:.0f} s, {len(crashes)} crashes", flush=True)
            for c in crashes:
                print("  " + c.replace("\n", "\n  "))
        if server is not None:  # still alive and right after everything it was sent
            x = np.ones((3, 64), np.float32)
            r = pb.ModelInferRequest(model_name="mlp")
            r.inputs.add(name="INPUT0", datatype="FP32", shape=[3, 64])
            r.raw_input_contents.append(x.tobytes())
            out = np.frombuffer(stub.ModelInfer(r, timeout=10).raw_output_contents[0], np.float32).reshape(3, 16)
            alive = bool(np.allclose(out, reference(x), rtol=1e-4, atol=1e-4)) and server.proc.poll() is None
            print(f"wire statuses: {dict(sorted(seen.items()))}; server alive and correct afterwards: {alive}")
            if not alive:
                results["wire-after"] = (1, ["server wrong or gone after the wire fuzz"], 0.0)
            channel.close()
    finally:
        if server is not None:
            server.__exit__()
    total = sum(t for t, _, _ in results.values())
    crashed = sum(len(c) for _, c, _ in results.values())
    print(f"fuzz: {total} inputs over {len(results)} properties in {a.minutes:.1f} min, {crashed} crashes")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
