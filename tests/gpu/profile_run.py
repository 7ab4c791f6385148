"""Where the host time of TensorRTBackend.run() goes (cProfile), for the small and heavy bench models.

    python -m tests.gpu.profile_run WORKDIR     (WORKDIR as given to bench.gpu_backend --out, plans cached there)
"""
from __future__ import annotations

import cProfile
import pathlib
import pstats
import sys
import threading
import time

import numpy as np


def main(workdir: pathlib.Path) -> None:
    from bench.gpu_backend import _models
    from trtserve.server.engine.backends.base import BackendConfig, TensorSpec
    from trtserve.server.engine.backends.tensorrt import TensorRTBackend

    for name, batch, n in (("small", 1, 3000), ("heavy", 1024, 400)):
        m = _models()[name]
        d = workdir / name / "1"
        if not (d / "model.onnx").exists():
            m.make(d / "model.onnx")
        cfg = BackendConfig(name, "1", d, "", m.max_batch, [TensorSpec("INPUT0", m.wire, m.dims_in)],
                            [TensorSpec("OUTPUT0", m.wire, m.dims_out)], 4, m.parameters, cache_dir=workdir / "cache")
        b = TensorRTBackend(cfg)
        b.open()
        x = np.random.default_rng(0).standard_normal((batch,) + m.dims_in).astype(np.float16 if m.wire == "FP16" else np.float32)
        for _ in range(50):
            b.run(0, {"INPUT0": x}, ["OUTPUT0"])
        t0 = time.perf_counter()
        for _ in range(n):
            r = b.run(0, {"INPUT0": x}, ["OUTPUT0"])
        dt = (time.perf_counter() - t0) / n
        print(f"\n== {name} batch {batch}: {dt * 1e6:.1f} us per run() on one thread; last BatchResult ns: "
              f"input {r.compute_input_ns} infer {r.compute_infer_ns} output {r.compute_output_ns}")
        for k in (2, 4):
            count = [0] * k
            stop = threading.Event()

            def loop(i: int) -> None:
                while not stop.is_set():
                    b.run(i, {"INPUT0": x}, ["OUTPUT0"])
                    count[i] += 1

            ts = [threading.Thread(target=loop, args=(i,)) for i in range(k)]
            for t in ts:
                t.start()
            time.sleep(1.0)
            stop.set()
            for t in ts:
                t.join()
            print(f"   {k} threads: {sum(count) / 1.0:.0f} runs/s ({sum(count) * batch:.0f} rows/s)")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            b.run(0, {"INPUT0": x}, ["OUTPUT0"])
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
        b.close()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
