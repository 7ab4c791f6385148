"""The benchmark scripts in bench/ keep working (their numbers are measured elsewhere, never asserted here)."""
from __future__ import annotations

import itertools
import os
from typing import List

import pytest

pytest.importorskip("bench.agreement", reason="the bench/ folder is not on the path")


def test_batcher_overhead_measures_requests() -> None:
    from bench.batcher_overhead import measure

    assert measure(batch=64, instances=2, run_s=0.0002, seconds=0.3) > 0


def test_fuzz_runs_every_property_of_the_fuzz_test_module(capsys: "pytest.CaptureFixture[str]") -> None:
    pytest.importorskip("hypothesis")
    from bench import fuzz
    from tests import test_fuzz_properties

    names = fuzz.properties()
    assert names and all(callable(getattr(test_fuzz_properties, n)) for n in names)
    assert "test_plan_respects_max_batch_profiles_and_never_splits_a_request" in names
    assert fuzz.main(["--minutes", "0.02", "--chunk", "2", "--no-wire"]) == 0
    out = capsys.readouterr().out
    assert all(f"{n}: " in out for n in names) and "0 crashes" in out


def test_gpu_frontends_model_takes_the_instance_count_and_queue_delay(tmp_path) -> None:
    pytest.importorskip("onnx")  # the model is built as ONNX
    from bench.gpu_frontends import _repo
    from trtserve.server.engine.repository.pbtxt import read_config

    plain = read_config(_repo(tmp_path / "a") / "m")
    assert plain.instance_group[0].count == 2 and plain.dynamic_batching.max_queue_delay_microseconds == 0
    assert plain.HasField("dynamic_batching")
    tuned = read_config(_repo(tmp_path / "b", instances=1, queue_delay_us=500) / "m")
    assert tuned.instance_group[0].count == 1 and tuned.dynamic_batching.max_queue_delay_microseconds == 500


def test_agreement_takes_medians_per_tool_and_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.agreement as agreement

    pa = itertools.cycle([100.0, 300.0, 200.0])
    ours = itertools.cycle([90.0, 95.0, 400.0])
    monkeypatch.setattr(agreement, "load_perf_analyzer",
                        lambda pa_path, url, level, duration: {"rps": next(pa) * level, "p50_ms": 1.0})
    monkeypatch.setattr(agreement, "load_trtserve",
                        lambda url, level, duration, transport: {"rps": next(ours) * level, "p50_ms": 2.0})
    med = agreement.compare("127.0.0.1:1", [1, 8], rounds=3, duration=0.1, pa="pa")
    assert med[("perf_analyzer", 1)]["rps"] == 200.0  # median of 100, 300, 200 (levels interleave per round)
    assert med[("trtserve bench", 8)]["n"] == 3
    assert med[("trtserve bench", 1)]["p50_ms"] == 2.0


def _stat(pid: int, comm: str, utime: int, stime: int) -> str:
    # fields 1-2, then state (3) ... utime (14), stime (15), cutime, cstime, and more that are ignored
    return f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194304 100 0 0 0 {utime} {stime} 999 999 20 0 3 0 1 1 1\n"


def test_frontends_counts_cpu_of_the_whole_process_tree() -> None:
    from bench.frontends import cpu_cores, stat_cpu_ticks, tree_cpu_ticks

    assert stat_cpu_ticks(_stat(7, "python3 (x) y", 12, 30)) == 42  # a command name with spaces and parentheses
    proc = {  # supervisor 10 (threads 10, 11) -> front ends 20, 21 (from two threads), engine 30 under front end 20
        "/proc/10/stat": _stat(10, "trtserve", 100, 50), "/proc/10/task/10/children": "20 ",
        "/proc/10/task/11/children": "21", "/proc/20/stat": _stat(20, "frontend", 10, 5),
        "/proc/20/task/20/children": "30", "/proc/21/stat": _stat(21, "frontend", 1, 1),
        "/proc/21/task/21/children": "", "/proc/30/stat": _stat(30, "engine", 1000, 200),
        "/proc/99/stat": _stat(99, "unrelated", 5000, 5000),
    }
    tasks = {10: [10, 11], 20: [20], 21: [21], 30: [30], 99: [99]}
    total = tree_cpu_ticks(10, proc.get, lambda pid: tasks.get(pid, []))
    assert total == 150 + 15 + 2 + 1200
    del proc["/proc/30/stat"]  # the engine exited between reads: it counts as nothing, no crash
    assert tree_cpu_ticks(10, proc.get, lambda pid: tasks.get(pid, [])) == 167
    assert cpu_cores(100, 300, 2.0, 100) == 1.0


def test_frontends_splits_cpu_by_role() -> None:
    from bench.frontends import role_cores, role_ticks

    proc = {  # supervisor 10 -> engine 30 (main thread 30, completion thread 31), front ends 20 and 21
        "/proc/10/stat": _stat(10, "python", 10, 0), "/proc/10/cmdline": "python\0-m\0trtserve\0serve",
        "/proc/10/task/10/children": "30 20 21",
        "/proc/30/stat": _stat(30, "python", 300, 100), "/proc/30/task/30/stat": _stat(30, "python", 200, 50),
        "/proc/30/cmdline": "python\0-m\0trtserve.server.engine.process",
        "/proc/20/stat": _stat(20, "python", 100, 0), "/proc/20/cmdline": "python\0-m\0trtserve.server.frontend.process",
        "/proc/21/stat": _stat(21, "python", 50, 0), "/proc/21/cmdline": "python\0-m\0trtserve.server.frontend.process",
    }
    tasks = {10: [10], 20: [20], 21: [21], 30: [30, 31]}
    before = role_ticks(10, proc.get, lambda pid: tasks.get(pid, []))
    assert before == {"other 10": 10, "engine 30": 400, "loop 30": 250, "frontend 20": 100, "frontend 21": 50}
    after = dict(before, **{"engine 30": 600, "loop 30": 350, "frontend 20": 300, "frontend 22": 100})
    cores = role_cores(before, after, 2.0, 100)  # front end 21 died, 22 replaced it
    assert cores == {"engine": 1.0, "loop": 0.5, "frontends": 1.5, "frontend max": 1.0, "other": 0.0}


def test_frontends_reads_the_machines_steal_time() -> None:
    from bench.frontends import steal_ticks

    stat = "cpu  2824266 0 737200 7201812 21682 0 59483 18307 0 0\ncpu0 1 0 1 1 1 0 1 9 0 0\n"
    assert steal_ticks({"/proc/stat": stat}.get) == 18307  # the eighth number of the all-CPU line
    assert steal_ticks({"/proc/stat": "cpu  1 2 3 4\n"}.get) is None  # a kernel that does not report it
    assert steal_ticks({}.get) is None


def test_frontends_mean_batch_from_metrics_and_goal_lines() -> None:
    pytest.importorskip("prometheus_client")
    from bench.frontends import batch_counts, goal_lines, mean_batch, median_row, table_rows

    def sample(rows: int, batches: int) -> str:
        return ("# HELP nv_inference_count Number of inferences performed\n# TYPE nv_inference_count counter\n"
                f'nv_inference_count{{model="m",version="1"}} {rows - 10}.0\n'
                'nv_inference_count{model="m",version="2"} 10.0\n'
                'nv_inference_count{model="other",version="1"} 5000.0\n'
                "# HELP nv_inference_exec_count Number of model executions performed\n"
                "# TYPE nv_inference_exec_count counter\n"
                f'nv_inference_exec_count{{model="m",version="1"}} {batches}.0\n'
                'nv_inference_exec_count{model="other",version="1"} 7.0\n')

    before, after = batch_counts(sample(100, 50)), batch_counts(sample(1100, 150))
    assert before == (100.0, 50.0)
    assert mean_batch(before, after) == 10.0
    assert mean_batch(before, before) is None
    assert median_row([None, {"rps": 1.0, "p50_ms": 2.0}, {"rps": 3.0, "p50_ms": 4.0}, {"rps": 2.0, "p50_ms": 9.0}]
                      ) == {"n": 3, "rps": 2.0, "p50_ms": 4.0}
    results = {("ceiling", 1): {"rps": 2000.0, "p50_ms": 0.40, "p99_ms": 1.0, "mean_batch": None, "cpu_cores": 0.8},
               ("trtserve f2", 1): {"rps": 1500.0, "p50_ms": 0.65, "p99_ms": 1.5, "mean_batch": 1.0, "cpu_cores": 1.0},
               ("ceiling", 32): {"rps": 3000.0, "p50_ms": 10.0, "p99_ms": 20.0, "mean_batch": None, "cpu_cores": 1.2},
               ("trtserve f2", 32): {"rps": 3300.0, "p50_ms": 9.0, "p99_ms": 12.0, "mean_batch": 10.0,
                                     "cpu_cores": 1.5},
               ("trtserve f2", 128): None}
    rows = table_rows(["ceiling", "trtserve f2"], [1, 32, 128], results)
    assert rows[1] == ["trtserve f2", "1", "1500", "0.65", "1.50", "1.0", "1.00"]
    assert rows[2][5] == "n/a" and rows[-1][2:] == ["failed"] * 5
    goals = goal_lines(["ceiling", "trtserve f2"], [1, 8, 32, 128], results)
    assert len(goals) == 3  # level 8 has no goal
    assert "MET" in goals[0] and "MET" in goals[1] and "1.10x" in goals[1] and "rounds" not in goals[1]
    assert "no verdict" in goals[2]
    # each round's ratio beside the verdict on the medians; a round where either side failed is left out
    rounds = {("ceiling", 32): [{"rps": 3000.0}, {"rps": 2000.0}, None, {"rps": 4000.0}],
              ("trtserve f2", 32): [{"rps": 3300.0}, {"rps": 1900.0}, {"rps": 9999.0}, None]}
    goals = goal_lines(["ceiling", "trtserve f2"], [32], results, rounds)
    assert "(1.10x, goal >= 1.00x; rounds 1.10x, 0.95x)" in goals[0]


def test_frontends_cpu_per_request_by_process() -> None:
    from bench.frontends import _by_process, busy_ticks, process_rows

    stat = "cpu  2000 10 500 7201812 21682 30 60 18307 0 0\ncpu0 1 0 1 1 1 0 1 9 0 0\n"
    assert busy_ticks({"/proc/stat": stat}.get) == 2000 + 10 + 500 + 30 + 60  # neither idle, iowait nor steal
    assert busy_ticks({}.get) is None
    # a trtserve server over 2 s at 100 ticks/s: 1.5 cores in all, front ends 1.0, engine 0.4; the machine 2.0
    roles0 = {"other 10": 0, "engine 30": 0, "loop 30": 0, "frontend 20": 0, "frontend 21": 0}
    roles1 = {"other 10": 20, "engine 30": 80, "loop 30": 70, "frontend 20": 120, "frontend 21": 80}
    r = {"rps": 4000.0, "cpu_cores": 1.5}
    split = _by_process(r, roles0, roles1, 1000, 1400, 2.0, 100)
    assert split == pytest.approx({"server_us": 375.0, "frontends_us": 250.0, "engine_us": 100.0, "rest_us": 125.0})
    # the ceiling is one process: no front ends or engine of its own; no /proc/stat: no rest
    ceiling = _by_process({"rps": 5000.0, "cpu_cores": 1.0}, {"other 5": 0}, {"other 5": 200}, None, None, 2.0, 100)
    assert ceiling == {"server_us": 200.0, "frontends_us": None, "engine_us": None, "rest_us": None}
    rows = process_rows(["ceiling", "trtserve f2"], [32], {("ceiling", 32): dict(ceiling, rps=5000.0),
                                                          ("trtserve f2", 32): None})
    assert rows == [["ceiling", "32", "5000", "200", "n/a", "n/a", "n/a"], ["trtserve f2", "32"] + ["failed"] * 5]


def test_http_bench_rows_and_verdicts() -> None:
    from bench.http import Target, rows, verdicts

    grpc_t, http_t = Target("trtserve f1 / grpc", None, "grpc", 1), Target("trtserve f1 / http", None, "http", 2)
    results = {("trtserve f1 / grpc", 1): {"rps": 700.0, "p50_ms": 1.3, "p99_ms": 4.0, "cpu_cores": 0.9},
               ("trtserve f1 / http", 1): {"rps": 650.0, "p50_ms": 1.4, "p99_ms": 3.0, "cpu_cores": 0.8},
               ("trtserve f1 / grpc", 32): {"rps": 1500.0, "p50_ms": 21.0, "p99_ms": 38.0, "cpu_cores": 1.4},
               ("trtserve f1 / http", 32): {"rps": 3000.0, "p50_ms": 10.5, "p99_ms": 17.0, "cpu_cores": 1.2},
               ("trtserve f1 / http", 8): None}
    table = rows([grpc_t, http_t], [1, 32], results)
    assert table[0] == ["trtserve f1", "grpc", "1", "700", "1.30", "4.00", "0.90"]
    assert table[3][1:4] == ["http", "32", "3000"]
    lines = verdicts([1, 8, 32], results, http_t.name, grpc_t.name)
    assert "0.93x" in lines[0] and lines[0].endswith("MISSED")  # HTTP slower than gRPC at 1
    assert "no verdict" in lines[1]
    assert "2.00x" in lines[2] and lines[2].endswith("MET")


def test_gpu_server_split_per_request() -> None:
    from bench.gpu import describe_split, server_split

    before = {"requests": 10, "request_ns": 10_000_000, "queue_ns": 1_000_000, "compute_input_ns": 100_000,
              "compute_infer_ns": 500_000, "compute_output_ns": 100_000}
    after = {"requests": 110, "request_ns": 510_000_000, "queue_ns": 301_000_000, "compute_input_ns": 10_100_000,
             "compute_infer_ns": 100_500_000, "compute_output_ns": 20_100_000}
    us = server_split(before, after)
    assert us == pytest.approx({"request": 5000.0, "queue": 3000.0, "compute_input": 100.0, "compute_infer": 1000.0,
                                "compute_output": 200.0, "other": 700.0})
    assert describe_split(us) == ("server 5,000 us/request = queue 3,000 + compute in 100 / infer 1,000 / out 200 + "
                                  "other 700")
    assert server_split(before, before) == {} and "no successful" in describe_split({})


def test_gpu_trace_split_medians_before_the_queue_and_after_compute() -> None:
    from bench.gpu import describe_trace, trace_split

    def trace(i: int, start: int, queued: int, computed: int, end: int) -> List[dict]:
        names = ("REQUEST_START", "QUEUE_START", "COMPUTE_END", "REQUEST_END")
        return [{"id": i, "model_name": "m", "model_version": 1, "request_id": ""},
                {"id": i, "timestamps": [{"name": n, "ns": ns} for n, ns in zip(names, (start, queued, computed, end))]}]

    records = trace(1, 0, 1_000, 5_000, 9_000) + trace(2, 0, 3_000, 6_000, 8_000) + trace(3, 0, 2_000, 4_000, 10_000)
    records.append({"id": 4, "timestamps": [{"name": "REQUEST_START", "ns": 0}]})  # unfinished: not counted
    assert trace_split(records) == {"n": 3, "before_queue": 2.0, "after_compute": 4.0}
    assert describe_trace(trace_split(records)) == "; traced (median of 3): 2 us before the queue, 4 after compute"
    assert trace_split([]) == {} and describe_trace({}) == ""


@pytest.mark.parametrize("share, seen", [(1, "1"), (None, "unset")])
def test_load_perf_analyzer_sets_contexts_per_connection(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                        share, seen) -> None:
    """``share`` reaches perf_analyzer as TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT (how many of its contexts share
    one gRPC connection, and so one front end under SO_REUSEPORT); without it tritonclient's default applies; the
    CPU it used is counted. A stand-in perf_analyzer records what it was given, spins, and writes the CSV the real
    one writes."""
    from bench.cpu import load_perf_analyzer

    monkeypatch.delenv("TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT", raising=False)
    record = tmp_path / "env.txt"
    pa = tmp_path / "perf_analyzer"
    pa.write_text("#!/bin/sh\n"
                  f'echo "${{TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT:-unset}}" > {record}\n'
                  'i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done\n'
                  'while [ "$1" != "-f" ]; do shift; done\n'
                  f'printf "{PA_CSV}" > "$2"\n')
    pa.chmod(0o755)
    r = load_perf_analyzer(str(pa), "127.0.0.1:1", 32, 1.0, model="m", batch=2, share=share)
    assert record.read_text().strip() == seen
    assert r is not None and r.pop("client_cores") > 0
    assert r == {"rps": 1024.0, "rows_per_s": 2048.0, "p50_ms": 1.5, "p99_ms": 3.0, "errors": 0,
                 "client_us": {"send": 2.0, "network_server": 1183.0, "recv": 1.0}}


# perf_analyzer's CSV (-f) as it writes it for a gRPC server with statistics (its columns, in its order)
PA_CSV = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
          "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency"
          "\\n32,2048,2,1183,285,20,30,1,1,1500,2036,2144,3000\\n")


def test_gpu_rows_say_where_time_outside_the_server_went() -> None:
    """The transport's share is perf_analyzer's network+server time less the server's time outside its queue and
    compute; nothing is printed where either side is missing (older rows, trtserve bench)."""
    from bench import gpu

    client = {"send": 2.0, "network_server": 1183.0, "recv": 1.0}
    server = {"request": 526.0, "queue": 285.0, "compute_input": 20.0, "compute_infer": 30.0, "compute_output": 1.0,
              "other": 190.0}
    assert gpu.describe_client(client, server) == "; outside the server: perf_analyzer 3 us, transport 993"
    assert gpu.describe_client({}, server) == gpu.describe_client(client, {}) == ""


def test_gpu_report_names_each_rows_load_tool_and_load_runs_off_the_engines_cpus(tmp_path) -> None:
    """bench.gpu's server table has a row per load tool (``--heavy-tools``), older rows read as perf_analyzer's;
    ``_pinned`` runs a load on the CPUs given and gives this process its CPUs back; an unknown tool is refused."""
    from bench import gpu

    row = {"base": "heavy", "instances": 4, "graphs": True, "shm": "cuda", "concurrency": 128, "rows_per_s": 3.5e6,
           "p50_ms": 9.0, "p99_ms": 14.0, "mean_batch": 5000.0, "raw_rows_per_s": 7.0e6, "raw_batch": 8192}
    gpu.render({"server": [dict(row, tool="perf_analyzer"), dict(row, tool="trtserve bench", rows_per_s=2.8e6),
                           row]}, tmp_path)
    md = (tmp_path / "gpu.md").read_text()
    assert "| heavy | 4 | on | CUDA shm | perf_analyzer | 128 | 3,500,000 | 9.00 | 14.00 | 5000 | 50% |" in md
    assert "| heavy | 4 | on | CUDA shm | trtserve bench | 128 | 2,800,000 | 9.00 | 14.00 | 5000 | 40% |" in md
    assert md.count("| CUDA shm | perf_analyzer |") == 2
    mine = os.sched_getaffinity(0)
    one = {min(mine)}
    assert gpu._pinned(one, os.sched_getaffinity, 0) == one
    assert os.sched_getaffinity(0) == mine
    assert gpu._pinned(None, os.sched_getaffinity, 0) == mine
    assert gpu._tool("trtserve-bench") == "trtserve bench"
    with pytest.raises(SystemExit, match="'wrk' is not one of perf_analyzer, trtserve-bench"):
        gpu._tool("wrk")


def test_gpu_rows_name_the_cores_each_role_used_and_the_hosts_steal() -> None:
    """``_cores_and_profile`` adds the cores each server role and perf_analyzer used, and the host's steal time over
    the run (a run slowed by the hypervisor is told apart from a slow server); the line names each."""
    import types

    from bench import gpu

    server = types.SimpleNamespace(proc=types.SimpleNamespace(pid=os.getpid()))
    r = gpu._cores_and_profile(server, "x", None, lambda: {"client_cores": 1.5})
    assert r is not None and r["cores"]["client"] == 1.5
    assert r["cores"]["steal"] >= 0.0  # Linux's /proc/stat reports it
    line = gpu.describe_cores(dict(r["cores"], engine=1.0, loop=0.9, frontends=5.0, steal=0.25))
    assert line.startswith("; cores: engine 1.00 (loop 0.90), front ends 5.00")
    assert line.endswith(", perf_analyzer 1.50, stolen by the host 0.25")
    del r["cores"]["steal"]
    assert "stolen" not in gpu.describe_cores(r["cores"])


@pytest.mark.parametrize("registered", ["all", "inference"])
def test_ceiling_server_serves_inference_and_metadata_however_methods_are_registered(registered: str) -> None:
    import subprocess
    import sys

    import grpc

    from trtserve.protos import grpc_service_pb2 as pb
    from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

    proc = subprocess.Popen([sys.executable, "-m", "bench.ceiling_server", "--port", "0", "--registered", registered],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split(":")[1].split()[0])  # type: ignore[union-attr]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=10).outputs[0].shape == [-1, 16]
            request = pb.ModelInferRequest(model_name="m", id="9")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 64])
            request.raw_input_contents.append(bytes(2 * 64 * 4))
            response = stub.ModelInfer(request, timeout=10)
            assert response.id == "9" and list(response.outputs[0].shape) == [2, 16]
    finally:
        proc.terminate()
        proc.wait(10)


def test_frontends_ceiling_runs_on_the_grpc_io_trtserve_serve_sets_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import frontends
    from trtserve import cli

    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    expected = cli.grpc_experiments_for("serve")
    assert expected == cli.SERVE_GRPC_EXPERIMENTS  # the grpcio the tests run on is one it was measured on
    assert frontends.make_ceiling("ceiling").env == {"GRPC_EXPERIMENTS": expected}
    assert frontends.make_ceiling("ceiling grpc defaults", grpc_defaults=True).env == {}
    monkeypatch.setenv("GRPC_EXPERIMENTS", "-event_engine_client")  # the user's: every server inherits it
    assert frontends.make_ceiling("ceiling").env == {}
