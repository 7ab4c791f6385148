"""``trtserve`` command line: ``serve`` (the server) and the client-side ``infer``, ``models``, ``bench``."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import sys
from typing import List, Optional


# Python hands the GIL to a waiting thread only every 5 ms while another thread keeps running Python. An instance
# thread coming back from a GPU synchronize would wait behind the event loop that long while the device idles.
# 200 us, measured on an H200 (bench.gpu_backend, ResNet-18-shaped model, inputs in device memory, batcher +
# executor over 4 instances, 5000 and 200 us alternated in one session): batch 32 45,251-47,905 -> 54,770-56,319
# images/s, batch 128 87,297-87,789 -> 89,665-91,649. On the CPU backend it costs instead (2-core VM, wide model,
# perf_analyzer at 32: 947-1,036 -> 900-942 req/s), so `auto` sets it only where TensorRT sees a CUDA device.
DEFAULT_GIL_SWITCH_INTERVAL_US = 200.0


class EnvError(Exception):
    """A TRTSERVE_* variable with a value its flag cannot take: main() prints the one line and exits 2."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TRTSERVE_{name}", default)


def _env_number(name: str, default, kind):
    raw = os.environ.get(f"TRTSERVE_{name}")
    if raw is None:
        return default
    try:
        return kind(raw.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise EnvError(f"TRTSERVE_{name}={raw!r} is not {what}") from None


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(f"TRTSERVE_{name}")
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise EnvError(f"TRTSERVE_{name}={raw!r} is not a boolean (1/true/yes/on or 0/false/no/off)")


def _env_choice(name: str, default: str, choices: List[str]) -> str:
    value = _env(name, default)
    if value not in choices:
        raise EnvError(f"TRTSERVE_{name}={value!r} is not one of {', '.join(choices)}")
    return value


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the inference server (gRPC and HTTP)",
                       description="Serve a Triton-style model repository over the KServe v2 gRPC and HTTP/REST protocols. "
                                   "Every flag also reads TRTSERVE_<FLAG> from the environment (e.g. "
                                   "TRTSERVE_GRPC_PORT); the flag wins.")
    p.add_argument("--model-repository", "--model-store", type=pathlib.Path,
                   default=_env("MODEL_REPOSITORY", "") or None,
                   help="model repository folder (default: the bundled example repository); --model-store is "
                        "Triton's spelling")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="address to serve gRPC, HTTP and /metrics on (default %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--grpc-port", type=int, default=_env_int("GRPC_PORT", 8001),
                   help="gRPC port (default %(default)s; 0 picks a free one)")
    p.add_argument("--http-port", type=int, default=_env_int("HTTP_PORT", 8000),
                   help="KServe v2 HTTP/REST port, served by the same front ends (default %(default)s; 0 picks a "
                        "free one; -1 turns HTTP off)")
    p.add_argument("--metrics-port", type=int, default=_env_int("METRICS_PORT", 8002),
                   help="HTTP port for /metrics (default %(default)s; -1 disables it)")
    p.add_argument("--log-level", default=_env_choice("LOG_LEVEL", "info", ["debug", "info", "warning", "error"]),
                   choices=["debug", "info", "warning", "error"], help="log level (default %(default)s)")
    p.add_argument("--exit-on-error", action=argparse.BooleanOptionalAction,
                   default=_env_bool("EXIT_ON_ERROR", True),
                   help="a model that fails to load at start stops the server with exit code 1 and the reason "
                        "(default); --no-exit-on-error starts with the models that loaded")
    p.add_argument("--strict-readiness", action=argparse.BooleanOptionalAction,
                   default=_env_bool("STRICT_READINESS", True),
                   help="ServerReady and gRPC health report ready only while every model that should be loaded is "
                        "READY (default); --no-strict-readiness: ready whenever the server serves")
    p.add_argument("--lenient-config", action="store_true", default=_env_bool("LENIENT_CONFIG", False),
                   help="load models whose config.pbtxt uses fields trtserve does not implement, with one warning "
                        "per field, instead of failing them (for migrating a repository; docs/model-config.md)")
    p.add_argument("--model-control-mode", choices=["none", "poll", "explicit"],
                   default=_env_choice("MODEL_CONTROL_MODE", "none", ["none", "poll", "explicit"]),
                   help="none (default): load every model at start, refuse the load/unload RPCs; explicit: load only "
                        "--load-model's models, then what the load/unload RPCs ask; poll: load every model and "
                        "follow changes to the repository (docs/model-control.md)")
    p.add_argument("--load-model", action="append", metavar="NAME", default=None,
                   help="with --model-control-mode explicit: a model to load at start (repeatable; '*' alone: every "
                        "model; TRTSERVE_LOAD_MODEL takes a comma-separated list)")
    p.add_argument("--repository-poll-secs", type=float, default=_env_float("REPOSITORY_POLL_SECS", 15.0),
                   help="with --model-control-mode poll: seconds between scans of the repository (default "
                        "%(default)s)")
    p.add_argument("--drain-seconds", type=float, default=_env_float("DRAIN_SECONDS", 30.0),
                   help="on SIGTERM/SIGINT, how long in-flight requests may take to finish (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=_env_int("MAX_MESSAGE_BYTES", 128 << 20),
                   help="largest request or response message in bytes (default 128 MiB); shared-memory inputs are "
                        "held to it too")
    p.add_argument("--frontends", default=_env("FRONTENDS", "auto"),
                   help="front-end processes (gRPC and HTTP) on the ports, beside one engine process; 0 serves from this one "
                        "process (debugging); auto (default): chosen from the CPUs this process may use")
    p.add_argument("--arena-bytes", type=int, default=_env_int("ARENA_BYTES", 512 << 20),
                   help="per front end: shared memory for the tensors of its requests in flight (default 512 MiB, "
                        "taken as used); a full arena answers UNAVAILABLE")
    p.add_argument("--max-inflight", type=int, default=_env_int("MAX_INFLIGHT", 4096),
                   help="per front end: inference requests in flight before new ones are answered UNAVAILABLE "
                        "(default %(default)s)")
    p.add_argument("--max-stream-inflight", type=int, default=_env_int("MAX_STREAM_INFLIGHT", 64),
                   help="per ModelStreamInfer stream: requests read but not yet answered; past it the stream is "
                        "not read until responses are (default %(default)s)")
    p.add_argument("--max-shm-regions", type=int, default=_env_int("MAX_SHM_REGIONS", 1024),
                   help="registered shared-memory regions (system and CUDA); more answer RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    p.add_argument("--cache-dir", type=pathlib.Path, default=_env("CACHE_DIR", "") or None,
                   help="where built TensorRT plans are cached (default: ~/.cache/trtserve)")
    p.add_argument("--no-gpu-metrics", action="store_true", default=not _env_bool("GPU_METRICS", True),
                   help="do not query NVML for GPU metrics (or TRTSERVE_GPU_METRICS=0)")
    p.add_argument("--gil-switch-interval-us", default=_env("GIL_SWITCH_INTERVAL_US", "auto"),
                   help=f"how often Python may hand the GIL to another thread (sys.setswitchinterval); 0 keeps "
                        f"Python's 5000 us; auto (default): {DEFAULT_GIL_SWITCH_INTERVAL_US:g} us when TensorRT "
                        "and a CUDA device are there, else Python's")
    p.add_argument("--grpc-server-cert", type=pathlib.Path, default=_env("GRPC_SERVER_CERT", "") or None,
                   help="PEM certificate: serve gRPC and HTTP over TLS (with --grpc-server-key)")
    p.add_argument("--grpc-server-key", type=pathlib.Path, default=_env("GRPC_SERVER_KEY", "") or None,
                   help="PEM private key of --grpc-server-cert")
    p.add_argument("--grpc-root-cert", type=pathlib.Path, default=_env("GRPC_ROOT_CERT", "") or None,
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--auth-token-file", type=pathlib.Path, default=_env("AUTH_TOKEN_FILE", "") or None,
                   help="file holding a bearer token every RPC and HTTP request except health checks must present "
                        "(or set TRTSERVE_AUTH_TOKEN)")
    p.add_argument("--metrics-tls", action="store_true", default=_env_bool("METRICS_TLS", False),
                   help="serve /metrics over TLS with --grpc-server-cert and --grpc-server-key")
    p.add_argument("--metrics-auth", action="store_true", default=_env_bool("METRICS_AUTH", False),
                   help="require the bearer token (--auth-token-file) on /metrics too")
    p.add_argument("--max-concurrent-streams", type=int, default=_env_int("MAX_CONCURRENT_STREAMS", 256),
                   help="concurrent RPCs per client connection (default %(default)s; 0: grpc's default)")
    p.set_defaults(func=serve)


async def _serve(args: argparse.Namespace) -> int:
    from trtserve.server.app import ServerOptions, TrtServer
    from trtserve.server.frontend.security import TlsOptions
    from trtserve.server.examples import REPOSITORY

    repository = (args.model_repository or REPOSITORY).resolve()
    if not repository.is_dir():
        print(f"trtserve: --model-repository {args.model_repository}: "
              f"{'not a folder' if repository.exists() else 'no such folder'}", file=sys.stderr)
        return 2
    options = ServerOptions(
        model_repository=repository, host=args.host, grpc_port=args.grpc_port,
        http_port=None if args.http_port < 0 else args.http_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, max_message_bytes=args.max_message_bytes,
        drain_seconds=args.drain_seconds,
        cache_dir=args.cache_dir or pathlib.Path(os.path.expanduser("~/.cache/trtserve")),
        gpu_metrics=not args.no_gpu_metrics,
    )
    if (args.grpc_server_cert is None) != (args.grpc_server_key is None):
        raise SystemExit("trtserve: --grpc-server-cert and --grpc-server-key go together")
    if args.grpc_server_cert is not None:
        options.tls = TlsOptions(args.grpc_server_cert, args.grpc_server_key, args.grpc_root_cert)
    elif args.grpc_root_cert is not None:
        raise SystemExit("trtserve: --grpc-root-cert (mutual TLS) needs --grpc-server-cert and --grpc-server-key")
    token = os.environ.get("TRTSERVE_AUTH_TOKEN", "")
    if args.auth_token_file is not None:
        token = args.auth_token_file.read_text().strip()
    options.auth_token = token or None
    if args.metrics_tls and options.tls is None:
        raise SystemExit("trtserve: --metrics-tls needs --grpc-server-cert and --grpc-server-key")
    if args.metrics_auth and options.auth_token is None:
        raise SystemExit("trtserve: --metrics-auth needs a token (--auth-token-file or TRTSERVE_AUTH_TOKEN)")
    options.metrics_tls, options.metrics_auth = args.metrics_tls, args.metrics_auth
    options.max_concurrent_streams = args.max_concurrent_streams
    options.frontends = frontends_from(args.frontends)
    options.arena_bytes = args.arena_bytes
    options.max_inflight = args.max_inflight
    options.max_stream_inflight = args.max_stream_inflight
    options.max_shm_regions = args.max_shm_regions
    options.exit_on_error = args.exit_on_error
    options.strict_readiness = args.strict_readiness
    options.lenient_config = args.lenient_config
    problem = _model_control(args, options)
    if problem:
        print(f"trtserve: {problem}", file=sys.stderr)
        return 2
    server = TrtServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"trtserve: serving {options.model_repository} on {options.host}:{server.grpc_port} "
          f"(HTTP {server.http_port if server.http_port is not None else 'off'}; "
          f"metrics {server.metrics_port if server.metrics_port is not None else 'off'}; "
          f"{options.frontends} front-end processes)", flush=True)
    stopped = loop.create_task(stop.wait())
    ended = loop.create_task(server.wait())
    await asyncio.wait({stopped, ended}, return_when=asyncio.FIRST_COMPLETED)
    if ended.done():  # the server stopped by itself (its engine died): the exit code says so
        stopped.cancel()
        code = ended.result()
        print(f"trtserve: stopped with code {code}", flush=True)
        return int(code or 0)
    ended.cancel()
    logging.getLogger("trtserve").info("signal received: draining (up to %.0f s)", options.drain_seconds)
    await server.stop()
    print("trtserve: stopped", flush=True)
    return 0


def _model_control(args: argparse.Namespace, options) -> Optional[str]:
    """Sets the model-control options from the flags; what is wrong with them, if anything (Triton's rules)."""
    names = args.load_model
    if names is None:
        names = [n.strip() for n in _env("LOAD_MODEL", "").split(",") if n.strip()]
    if names and args.model_control_mode != "explicit":
        return f"--load-model needs --model-control-mode explicit (the mode is {args.model_control_mode}, " \
               "which loads every model at start)"
    if "*" in names and len(names) > 1:
        return "--load-model '*' loads every model and must be the only --load-model"
    if args.model_control_mode == "poll" and not args.repository_poll_secs > 0:
        return f"--repository-poll-secs must be more than 0, got {args.repository_poll_secs:g}"
    options.model_control_mode = args.model_control_mode
    options.startup_models = tuple(names)
    options.repository_poll_secs = args.repository_poll_secs
    return None


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity (a container's cpuset), and no more than its cgroup's CPU quota
    (Kubernetes' CPU limit), which the affinity does not show."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            q, period = f.read().split()[:2]
        if q != "max":
            quota = int(q) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) as f:
                q = int(f.read())
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) as f:
                period = int(f.read())
            if q > 0 and period > 0:
                quota = q / period
        except (OSError, ValueError):
            pass
    if quota is not None:
        cpus = min(cpus, max(1, int(quota + 0.999)))
    return cpus


def frontends_from(value: str, cpus: Optional[int] = None) -> int:
    """The --frontends value: a count, or ``auto``: one front end per two CPUs this process may use (affinity and
    CPU quota), at least one and at most eight, leaving room for the engine (docs/architecture.md says why)."""
    if value == "auto":
        cpus = usable_cpus() if cpus is None else cpus
        return max(1, min(8, cpus // 2))
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise SystemExit(f"trtserve: --frontends must be auto or a number >= 0, got {value!r}")
    return count


def _switch_interval_us(value: str) -> float:
    """The --gil-switch-interval-us value in us (0: leave Python's); ``auto`` asks whether TensorRT can run here."""
    if value == "auto":
        from trtserve.server.engine.backends.tensorrt import compat

        return DEFAULT_GIL_SWITCH_INTERVAL_US if compat.available()[0] else 0.0
    try:
        interval = float(value)
    except ValueError:
        interval = -1.0
    if interval < 0:
        raise SystemExit(f"trtserve: --gil-switch-interval-us must be auto or a number >= 0, got {value!r}")
    return interval


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    interval = _switch_interval_us(args.gil_switch_interval_us)
    if interval > 0:
        sys.setswitchinterval(interval / 1e6)
    from trtserve.server.engine.host import StartupFailure
    from trtserve.server.supervisor import StartError

    try:
        return asyncio.run(_serve(args))
    except OSError as e:  # a port that is taken, a missing certificate: one line, not a traceback
        print(f"trtserve: {e.strerror or e}" if e.filename is None else f"trtserve: {e}", file=sys.stderr)
        return 2
    except (StartupFailure, StartError) as e:  # a model failed to load, the metrics port is taken: one line
        print(f"trtserve: {e}", file=sys.stderr)
        return e.code


def build_parser() -> argparse.ArgumentParser:
    from trtserve import __version__

    parser = argparse.ArgumentParser(prog="trtserve", description="TensorRT inference server (KServe v2 / Triton gRPC)")
    parser.add_argument("--version", action="version", version=f"trtserve {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    try:  # the client-side commands live in trtserve.client (no server imports there)
        from trtserve.client import cli as client_cli
    except ImportError:
        client_cli = None
    if client_cli is not None:
        for name in ("add_infer_parser", "add_models_parser", "add_bench_parser"):
            if hasattr(client_cli, name):
                getattr(client_cli, name)(sub)
    return parser


def _bench_grpc_experiments(argv: List[str]) -> None:
    """For ``trtserve bench``: gRPC's EventEngine client off, unless GRPC_EXPERIMENTS is already set.

    With it on (grpcio's default), every blocking call's completion passes between gRPC's own threads and the
    caller's: 4 voluntary context switches per call against 1 without it, and 50-120 us more client CPU
    (``python -m bench.client_floor``: grpcio 1.85 on the 2-core VM, 1.80 on the H200 host's 16 cores, where the
    round trip to a server that answers at once fell from 0.76 to 0.59 ms). A load generator should add as little
    of its own to the latency it reports as it can (issue #6: agree with perf_analyzer at concurrency 1). gRPC
    reads the variable once, when it is imported, so this runs before anything imports grpc; the library API is
    left as it is."""
    if "bench" not in argv[:1] or "GRPC_EXPERIMENTS" in os.environ:
        return
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("grpcio").split(".")[:2])
    except Exception:  # noqa: BLE001 - no metadata (e.g. the GPU kit's unpacked site): leave gRPC's defaults
        return
    if (major, minor) >= (1, 70):  # the releases this was measured on carry the experiment
        os.environ["GRPC_EXPERIMENTS"] = "-event_engine_client"


def main(argv: Optional[List[str]] = None) -> int:
    _bench_grpc_experiments(list(sys.argv[1:] if argv is None else argv))
    try:
        parser = build_parser()
    except EnvError as e:  # read while the flags' defaults are built, so even --help reports it
        print(f"trtserve: {e}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage, not the program's
        sub = _subparser(parser, getattr(args, "command", None))
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


def _subparser(parser: argparse.ArgumentParser, name: Optional[str]) -> Optional[argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return None


if __name__ == "__main__":
    sys.exit(main())
