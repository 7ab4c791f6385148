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


@pytest.fixture
def unset_grpc_experiments(monkeypatch: pytest.MonkeyPatch) -> None:
    """GRPC_EXPERIMENTS unset for the test and as it was after it: the code under test sets it in os.environ itself,
    which monkeypatch undoes only for a variable it has recorded (a test after this one would inherit the value)."""
    monkeypatch.setenv("GRPC_EXPERIMENTS", "recorded")
    monkeypatch.delenv("GRPC_EXPERIMENTS")


def test_serve_and_bench_turn_eventengine_io_off_only_when_unset(monkeypatch: pytest.MonkeyPatch,
                                                                  unset_grpc_experiments: None) -> None:
    cli._grpc_experiments(["infer", "--model", "m"])
    assert "GRPC_EXPERIMENTS" not in os.environ  # the server and the load generator only
    cli._grpc_experiments([])
    assert "GRPC_EXPERIMENTS" not in os.environ
    cli._grpc_experiments(["bench", "--model", "m"])
    assert os.environ["GRPC_EXPERIMENTS"] == cli.BENCH_GRPC_EXPERIMENTS == "-event_engine_client"
    del os.environ["GRPC_EXPERIMENTS"]
    cli._grpc_experiments(["serve", "--frontends", "2"])
    assert os.environ["GRPC_EXPERIMENTS"] == cli.SERVE_GRPC_EXPERIMENTS
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")  # the user's choice, even an empty one, stands
    cli._grpc_experiments(["serve"])
    cli._grpc_experiments(["bench"])
    assert os.environ["GRPC_EXPERIMENTS"] == ""


def test_grpcio_release_is_read_without_importing_grpc(monkeypatch: pytest.MonkeyPatch,
                                                      unset_grpc_experiments: None) -> None:
    import importlib.metadata
    import importlib.util

    import grpc

    expected = tuple(int(x) for x in grpc.__version__.split(".")[:2])
    assert cli._grpcio_release() == expected

    def no_metadata(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)  # a site without metadata: the version file
    assert cli._grpcio_release() == expected
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cli._grpcio_release() is None  # neither: gRPC's defaults are left alone
    cli._grpc_experiments(["serve"])
    assert "GRPC_EXPERIMENTS" not in os.environ


@pytest.mark.parametrize("command", ["bench", "serve"])
def test_the_process_sets_it_before_grpc_loads(command: str) -> None:
    """In a fresh interpreter, main() must run before anything imports grpc, or gRPC never reads the variable."""
    code = ("import os, sys\nfrom trtserve import cli\nassert 'grpc' not in sys.modules\n"
            f"try:\n    cli.main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GRPC_EXPERIMENTS'))")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = cli.BENCH_GRPC_EXPERIMENTS if command == "bench" else cli.SERVE_GRPC_EXPERIMENTS
    assert out.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("value, known", [(cli.SERVE_GRPC_EXPERIMENTS, True), (cli.BENCH_GRPC_EXPERIMENTS, True),
                                          ("-no_such_experiment_here", False)])
def test_the_installed_grpc_knows_every_experiment_named(value: str, known: bool) -> None:
    """gRPC only logs a name it does not know and goes on with its defaults: a release that drops one of these would
    silently serve as before, so this fails instead (the made-up name shows that such a log line is seen)."""
    code = ("import asyncio, grpc\n"
            "async def main():\n"
            "    server = grpc.aio.server()\n"
            "    server.add_insecure_port('127.0.0.1:0')\n"
            "    await server.start()\n"
            "    await server.stop(0)\n"
            "asyncio.run(main())\n"
            "grpc.insecure_channel('127.0.0.1:1').close()\n")
    env = dict(os.environ, GRPC_EXPERIMENTS=value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ("Unknown experiment" not in out.stderr) == known, out.stderr


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
