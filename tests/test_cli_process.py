"""Process-level settings the ``trtserve`` CLI owns (the library never touches them)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trtserve import cli


def test_switch_interval_auto_follows_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    from trtserve.server.engine.backends.tensorrt import compat

    monkeypatch.setattr(compat, "available", lambda: (False, "no CUDA device visible"))
    assert cli._switch_interval_us("auto") == 0.0  # the CPU backend keeps Python's interval
    monkeypatch.setattr(compat, "available", lambda: (True, "8.6.0"))
    assert cli._switch_interval_us("auto") == cli.DEFAULT_GIL_SWITCH_INTERVAL_US
    assert cli._switch_interval_us("0") == 0.0
    assert cli._switch_interval_us("350") == 350.0
    for bad in ("-1", "fast"):
        with pytest.raises(ValueError, match="must be auto or a number"):  # the caller names flag or variable
            cli._switch_interval_us(bad)


def test_bench_turns_the_eventengine_client_off_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    cli._bench_grpc_experiments(["infer", "--model", "m"])
    assert "GRPC_EXPERIMENTS" not in os.environ  # only the load generator
    cli._bench_grpc_experiments(["bench", "--model", "m"])
    assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_client"
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")  # the user's choice, even an empty one, stands
    cli._bench_grpc_experiments(["bench"])
    assert os.environ["GRPC_EXPERIMENTS"] == ""


def test_bench_process_sets_it_before_grpc_loads() -> None:
    """In a fresh interpreter, main() must run before anything imports grpc, or gRPC never reads the variable."""
    code = ("import os, sys\nfrom trtserve import cli\nassert 'grpc' not in sys.modules\n"
            "try:\n    cli.main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GRPC_EXPERIMENTS'))")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "-event_engine_client"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_onnxruntime_threads_follow_the_cpu_affinity_not_the_core_count() -> None:
    """In a container cpuset (here: a process pinned to CPU 0) the ORT pool is sized by the CPUs it may use."""
    code = ("import os; from trtserve.server.engine.backends.onnxruntime import usable_cpus; "
            "print(usable_cpus(), os.cpu_count())")
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    usable, total = map(int, pinned.stdout.split())
    assert usable == 1 and total == os.cpu_count()
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(free.stdout.split()[0]) == len(os.sched_getaffinity(0))
