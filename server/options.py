"""Everything a server is started with: one dataclass, passed whole to every process (it pickles)."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Optional, Tuple

from trtserve.server.frontend.security import TlsOptions

MiB = 1 << 20


@dataclasses.dataclass
class ServerOptions:
    model_repository: pathlib.Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001  # 0 picks a free port
    http_port: Optional[int] = 8000  # KServe v2 REST, served by the same front ends; None turns it off; 0: a free port
    metrics_port: Optional[int] = 8002  # None disables /metrics; 0 picks a free port
    # the largest request or response message: big enough for real tensors (a batch of 64 224x224 RGB images
    # in FP32 is 38.5 MB), small enough that a few hostile messages cannot take the memory of the host;
    # docs/reliability.md says how to size it
    max_message_bytes: int = 128 * MiB
    drain_seconds: float = 30.0
    cache_dir: Optional[pathlib.Path] = None  # TensorRT plan cache
    gpu_metrics: bool = True
    # extra platform name -> backend factory (config.pbtxt ``platform``); for embedders and fault-injection tests
    # (with front-end processes the factories must pickle: module-level functions or classes)
    backend_factories: Mapping[str, object] = dataclasses.field(default_factory=dict)
    tls: Optional[TlsOptions] = None  # None: plaintext (loopback, or TLS terminated in front)
    auth_token: Optional[str] = None  # require "authorization: Bearer <token>" on every RPC but health
    metrics_tls: bool = False  # serve /metrics over TLS with the gRPC certificate and key (``tls``)
    metrics_auth: bool = False  # require the same bearer token on /metrics
    # per HTTP/2 connection: past it grpc answers new streams with REFUSED_STREAM, so one connection cannot pile
    # up more calls than the server takes off the wire (grpc cancels calls it holds unrequested beyond its own
    # pending limit, uncounted)
    max_concurrent_streams: int = 256
    drain_notice_seconds: float = 0.5  # on stop: NOT_SERVING this long before new calls are refused
    # process model: 0 = gRPC and the engine in this process; N > 0 = N gRPC front-end processes on the same port
    # and one engine process
    frontends: int = 0
    # the front ends' CPU scheduling policy (Linux): "batch" (SCHED_BATCH) lets the engine finish its loop turn when
    # its answers wake a front end on a shared core, instead of being preempted by it at every send
    # (docs/architecture.md gives the measurement); "normal" leaves the policy the server was started with
    frontend_scheduling: str = "batch"
    # Linux: the engine process's threads run on these CPUs and the front ends' on the others the server may use
    # (docs/architecture.md gives the measurement); None: the OS places every process
    engine_cpus: Optional[Tuple[int, ...]] = None
    # every process's asyncio event loop, resolved: "uvloop" or "asyncio" (server/process/loops.py says why); the CLI
    # resolves --event-loop (auto: uvloop where installed), an embedder that does not set it gets asyncio's loop
    event_loop: str = "asyncio"
    arena_bytes: int = 512 * MiB  # per front end: inputs and outputs of its requests in flight (touched lazily)
    max_inflight: int = 4096  # per front end: inference requests past it are answered UNAVAILABLE (counted)
    max_stream_inflight: int = 64  # per ModelStreamInfer stream: requests read but not yet answered and written
    max_shm_regions: int = 1024  # registered shared-memory regions per server (each holds a descriptor)
    restart_frontends: bool = True  # a front end that dies is started again (its own requests fail)
    # a front end whose own memory (anonymous RSS: not its arena, not shared libraries) passes this many bytes is
    # replaced: a new one starts, then the old one drains. grpc.aio keeps native memory of every call a client
    # cancels (or whose deadline passes) while grpc awaits the call's message or answer, so without it a front
    # end grows with cancellations for its whole life (docs/reliability.md). 0: never
    frontend_max_memory_bytes: int = 1024 * MiB
    frontend_memory_check_s: float = 5.0  # how often the supervisor reads the front ends' memory
    frontend_min_age_s: float = 60.0  # a front end younger than this is not replaced (a limit below a new one's size)
    # a child (front end or engine) whose event loop has not run for this many seconds is killed, and then handled
    # as one that died (server/process/heartbeat.py). 0: never
    watchdog_seconds: float = 30.0
    # a model that fails to load at start stops the server (StartupFailure; the CLI exits 1), as Triton's
    # --exit-on-error; False: the server starts with the models that loaded
    exit_on_error: bool = True
    # server readiness (ServerReady, grpc.health.v1) only while every model that should be loaded is READY
    # (Triton's --strict-readiness); False: ready whenever the server serves
    strict_readiness: bool = True
    # config.pbtxt fields trtserve does not implement: a logged warning each instead of a failed load
    lenient_config: bool = False
    # Triton's --model-control-mode: "none" loads every model at start and refuses the load/unload RPCs; "explicit"
    # loads ``startup_models`` ("*": all) and then what the load RPC asks; "poll" loads every model and rescans the
    # repository every ``repository_poll_secs`` (added, changed and removed models and versions)
    model_control_mode: str = "none"
    startup_models: Tuple[str, ...] = ()
    repository_poll_secs: float = 15.0
