"""``trtserve`` command line: ``serve`` (the server) and the client-side ``infer``, ``models``, ``bench``."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import re
import shlex
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, TypeVar

from trtserve.server.process import loops, placement

if TYPE_CHECKING:
    from trtserve.server.app import ServerOptions
    from trtserve.server.frontend.security import TlsOptions

T = TypeVar("T")

# Python hands the GIL to a waiting thread only every 5 ms while another thread keeps running Python. An instance
# thread coming back from a GPU synchronize would wait behind the event loop that long while the device idles.
# 200 us, measured on an H200 (bench.gpu_backend, ResNet-18-shaped model, inputs in device memory, batcher +
# executor over 4 instances, 5000 and 200 us alternated in one session): batch 32 45,251-47,905 -> 54,770-56,319
# images/s, batch 128 87,297-87,789 -> 89,665-91,649. On the CPU backend it costs instead (2-core VM, wide model,
# perf_analyzer at 32: 947-1,036 -> 900-942 req/s), so `auto` sets it only where TensorRT sees a CUDA device.
DEFAULT_GIL_SWITCH_INTERVAL_US = 200.0

INT32_MAX = (1 << 31) - 1  # gRPC takes its channel arguments (message sizes, streams) as C ints
GIVEN = "given_flags"  # the namespace attribute naming the serve options that were on the command line


class OptionError(Exception):
    """A flag or TRTSERVE_* variable with a value trtserve cannot use; the message names it as the user wrote it
    (``setting()``): main() prints the one line and exits 2."""


class EnvError(OptionError):
    """Found while the flags' defaults are read from the environment, so even ``--help`` reports it."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def setting(name: str, value: Any) -> str:
    """``TRTSERVE_GRPC_PORT=abc`` or ``--grpc-port abc``, quoted as a shell would take it back, so a message shows
    what to change and an empty value or one with spaces stays visible."""
    if name.startswith("TRTSERVE_"):
        return f"{name}={shlex.quote(str(value))}"
    if value is True:  # a switch: the flag alone
        return name
    if isinstance(value, list):  # a repeated flag
        return " ".join(f"{name} {shlex.quote(str(v))}" for v in value)
    return f"{name} {shlex.quote(str(value))}"


def env_var(dest: str) -> str:
    """The variable behind a serve option: every flag reads TRTSERVE_<FLAG> (the serve parser's description)."""
    return f"TRTSERVE_{dest.upper()}"


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def either(dest: str) -> str:
    """Both ways to set an option, for messages that ask for one."""
    return f"{flag(dest)} (or {env_var(dest)})"


def written(args: argparse.Namespace, dest: str) -> str:
    """An option's value as the user gave it: ``TRTSERVE_HOST=x`` when it came from the environment, ``--host x``
    when from the command line (the flag wins over the variable), so the message names what to fix. For options
    whose action is ``_Given``, which notes the flags given."""
    var = env_var(dest)
    if dest not in getattr(args, GIVEN, ()) and var in os.environ:
        return setting(var, os.environ[var])
    return setting(flag(dest), getattr(args, dest))


class _Given(argparse.Action):
    """argparse's ``store`` (``store_true`` with ``nargs=0``; ``append`` with ``append=True``) that also notes the
    option was on the command line: its default may have come from its TRTSERVE_* variable, and ``written()``
    must name whichever of the two the value came from."""

    def __init__(self, option_strings: List[str], dest: str, append: bool = False, **kwargs: Any) -> None:
        if kwargs.get("nargs") == 0:
            kwargs.setdefault("const", True)
        super().__init__(option_strings, dest, **kwargs)
        self.append = append

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        if self.nargs == 0:
            values = self.const
        elif self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, getattr(namespace, GIVEN, frozenset()) | {self.dest})


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
        raise EnvError(f"{setting(f'TRTSERVE_{name}', raw)}: not {what}") from None


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
    raise EnvError(f"{setting(f'TRTSERVE_{name}', raw)}: not a boolean (1/true/yes/on or 0/false/no/off)")


def _env_choice(name: str, default: str, choices: List[str]) -> str:
    value = _env(name, default)
    if value not in choices:
        raise EnvError(f"{setting(f'TRTSERVE_{name}', value)}: not one of {', '.join(choices)}")
    return value


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the inference server (gRPC and HTTP)",
                       description="Serve a Triton-style model repository over the KServe v2 gRPC and HTTP/REST protocols. "
                                   "Every flag also reads TRTSERVE_<FLAG> from the environment (e.g. "
                                   "TRTSERVE_GRPC_PORT); the flag wins.")
    # _Given notes the flags given, so a message about a bad value names the flag or the variable it came from
    p.add_argument("--model-repository", "--model-store", action=_Given, type=pathlib.Path,
                   default=_env("MODEL_REPOSITORY", "") or None,
                   help="model repository folder (default: the bundled example repository); --model-store is "
                        "Triton's spelling")
    p.add_argument("--host", action=_Given, default=_env("HOST", "127.0.0.1"),
                   help="address to serve gRPC, HTTP and /metrics on (default %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--grpc-port", action=_Given, type=int, default=_env_int("GRPC_PORT", 8001),
                   help="gRPC port (default %(default)s; 0 picks a free one)")
    p.add_argument("--http-port", action=_Given, type=int, default=_env_int("HTTP_PORT", 8000),
                   help="KServe v2 HTTP/REST port, served by the same front ends (default %(default)s; 0 picks a "
                        "free one; -1 turns HTTP off)")
    p.add_argument("--metrics-port", action=_Given, type=int, default=_env_int("METRICS_PORT", 8002),
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
    p.add_argument("--model-control-mode", action=_Given, choices=["none", "poll", "explicit"],
                   default=_env_choice("MODEL_CONTROL_MODE", "none", ["none", "poll", "explicit"]),
                   help="none (default): load every model at start, refuse the load/unload RPCs; explicit: load only "
                        "--load-model's models, then what the load/unload RPCs ask; poll: load every model and "
                        "follow changes to the repository (docs/model-control.md)")
    p.add_argument("--load-model", action=_Given, append=True, metavar="NAME", default=None,
                   help="with --model-control-mode explicit: a model to load at start (repeatable; '*' alone: every "
                        "model; TRTSERVE_LOAD_MODEL takes a comma-separated list)")
    p.add_argument("--repository-poll-secs", action=_Given, type=float,
                   default=_env_float("REPOSITORY_POLL_SECS", 15.0),
                   help="with --model-control-mode poll: seconds between scans of the repository (default "
                        "%(default)s)")
    p.add_argument("--drain-seconds", action=_Given, type=float, default=_env_float("DRAIN_SECONDS", 30.0),
                   help="on SIGTERM/SIGINT, how long in-flight requests may take to finish (default %(default)s)")
    p.add_argument("--max-message-bytes", action=_Given, type=int, default=_env_int("MAX_MESSAGE_BYTES", 128 << 20),
                   help="largest request or response message in bytes (default 128 MiB); shared-memory inputs are "
                        "held to it too")
    p.add_argument("--frontends", action=_Given, default=_env("FRONTENDS", "auto"),
                   help="front-end processes (gRPC and HTTP) on the ports, beside one engine process; 0 serves from this one "
                        "process (debugging); auto (default): chosen from the CPUs this process may use")
    p.add_argument("--engine-cpus", action=_Given, default=_env("ENGINE_CPUS", "") or None, metavar="LIST",
                   help="Linux: run the engine process on these CPUs (a list such as 0-1 or 0,8) and the front ends "
                        "on the others this process may use, so that no front end takes the engine's cores "
                        "(default: the OS places every process; docs/architecture.md)")
    p.add_argument("--frontend-scheduling", action=_Given, choices=["batch", "normal"],
                   default=_env_choice("FRONTEND_SCHEDULING", "batch", ["batch", "normal"]),
                   help="the front ends' CPU scheduling policy on Linux: batch (default) lets the engine finish its "
                        "work when its answers wake a front end on a busy core; normal keeps the server's policy")
    p.add_argument("--event-loop", action=_Given, choices=list(loops.CHOICES),
                   default=_env_choice("EVENT_LOOP", "auto", list(loops.CHOICES)),
                   help="every process's event loop: auto (default) takes uvloop where it is installed (it is a "
                        "dependency), else asyncio's own")
    p.add_argument("--arena-bytes", action=_Given, type=int, default=_env_int("ARENA_BYTES", 512 << 20),
                   help="per front end: shared memory for the tensors of its requests in flight (default 512 MiB, "
                        "taken as used); a full arena answers UNAVAILABLE")
    p.add_argument("--frontend-max-memory-mib", action=_Given, type=int,
                   default=_env_int("FRONTEND_MAX_MEMORY_MIB", 1024),
                   help="a front end whose own memory passes this many MiB is replaced by a new one while it drains "
                        "(bounds what client cancellations leave in gRPC; default %(default)s; 0: never)")
    p.add_argument("--watchdog-seconds", action=_Given, type=float, default=_env_float("WATCHDOG_SECONDS", 30.0),
                   help="a front end or engine process whose event loop has not run for this long is killed, then "
                        "handled as one that died (default %(default)s; 0: never)")
    p.add_argument("--max-inflight", action=_Given, type=int, default=_env_int("MAX_INFLIGHT", 4096),
                   help="per front end: inference requests in flight before new ones are answered UNAVAILABLE "
                        "(default %(default)s)")
    p.add_argument("--max-stream-inflight", action=_Given, type=int, default=_env_int("MAX_STREAM_INFLIGHT", 64),
                   help="per ModelStreamInfer stream: requests read but not yet answered; past it the stream is "
                        "not read until responses are (default %(default)s)")
    p.add_argument("--max-shm-regions", action=_Given, type=int, default=_env_int("MAX_SHM_REGIONS", 1024),
                   help="registered shared-memory regions (system and CUDA); more answer RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    p.add_argument("--cache-dir", action=_Given, type=pathlib.Path, default=_env("CACHE_DIR", "") or None,
                   help="where built TensorRT plans are cached (default: ~/.cache/trtserve)")
    p.add_argument("--no-gpu-metrics", action="store_true", default=not _env_bool("GPU_METRICS", True),
                   help="do not query NVML for GPU metrics (or TRTSERVE_GPU_METRICS=0)")
    p.add_argument("--gil-switch-interval-us", action=_Given, default=_env("GIL_SWITCH_INTERVAL_US", "auto"),
                   help=f"how often Python may hand the GIL to another thread (sys.setswitchinterval); 0 keeps "
                        f"Python's 5000 us; auto (default): {DEFAULT_GIL_SWITCH_INTERVAL_US:g} us when TensorRT "
                        "and a CUDA device are there, else Python's")
    p.add_argument("--grpc-server-cert", action=_Given, type=pathlib.Path, default=_env("GRPC_SERVER_CERT", "") or None,
                   help="PEM certificate: serve gRPC and HTTP over TLS (with --grpc-server-key)")
    p.add_argument("--grpc-server-key", action=_Given, type=pathlib.Path, default=_env("GRPC_SERVER_KEY", "") or None,
                   help="PEM private key of --grpc-server-cert")
    p.add_argument("--grpc-root-cert", action=_Given, type=pathlib.Path, default=_env("GRPC_ROOT_CERT", "") or None,
                   help="PEM CA: require client certificates signed by it (mutual TLS)")
    p.add_argument("--auth-token-file", action=_Given, type=pathlib.Path, default=_env("AUTH_TOKEN_FILE", "") or None,
                   help="file holding a bearer token every RPC and HTTP request except health checks must present "
                        "(or set TRTSERVE_AUTH_TOKEN)")
    p.add_argument("--metrics-tls", action=_Given, nargs=0, default=_env_bool("METRICS_TLS", False),
                   help="serve /metrics over TLS with --grpc-server-cert and --grpc-server-key")
    p.add_argument("--metrics-auth", action=_Given, nargs=0, default=_env_bool("METRICS_AUTH", False),
                   help="require the bearer token (--auth-token-file) on /metrics too")
    p.add_argument("--max-concurrent-streams", action=_Given, type=int, default=_env_int("MAX_CONCURRENT_STREAMS", 256),
                   help="concurrent RPCs per client connection (default %(default)s; 0: grpc's default)")
    p.set_defaults(func=serve, **{GIVEN: frozenset()})


def checked(args: argparse.Namespace, dest: str, check: Callable[[Any], T]) -> T:
    """``check(value)`` of one serve option; its ValueError becomes the one-line OptionError that names the flag or
    variable the value came from."""
    try:
        return check(getattr(args, dest))
    except ValueError as e:
        raise OptionError(f"{written(args, dest)}: {e}") from None


def between(low: float, high: Optional[float] = None, above: bool = False) -> Callable[[float], float]:
    """A check that a number lies in [low, high] (``above``: more than ``low``)."""
    if above:
        rule = f"must be more than {low}"
    else:
        rule = f"must be at least {low}" if high is None else f"must be from {low} to {high}"

    def check(value: float) -> float:
        if (value <= low if above else value < low) or (high is not None and value > high):
            raise ValueError(rule)
        return value
    return check


# each number's range: what the server, the OS and gRPC can take (ports; gRPC's C ints); -1 turns a port off
RANGES = {
    "grpc_port": between(0, 65535), "http_port": between(-1, 65535), "metrics_port": between(-1, 65535),
    "max_message_bytes": between(1, INT32_MAX), "max_concurrent_streams": between(0, INT32_MAX),
    "arena_bytes": between(1), "frontend_max_memory_mib": between(0), "max_inflight": between(1),
    "max_stream_inflight": between(1),
    "max_shm_regions": between(0), "drain_seconds": between(0), "watchdog_seconds": between(0),
    "repository_poll_secs": between(0, above=True),
}


def folder(path: pathlib.Path) -> pathlib.Path:
    """The resolved model repository; ValueError unless it is a folder."""
    resolved = path.resolve()
    if not resolved.is_dir():
        raise ValueError("not a folder" if resolved.exists() else "no such folder")
    return resolved


def readable(path: pathlib.Path) -> bytes:
    """The file's bytes; ValueError saying why they cannot be read (checked before the server starts, so a missing
    certificate or token file is one line, not a failure in a child process)."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror or e}") from None


def plan_cache(path: pathlib.Path) -> pathlib.Path:
    """The plan cache folder, created if missing; ValueError when it cannot be. A folder that exists but cannot be
    written stays usable (plans built ahead, mounted read-only): a warning only."""
    if path.exists() and not path.is_dir():
        raise ValueError("not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create it: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        logging.getLogger("trtserve").warning("plan cache %s is read-only: plans built now will not be kept", path)
    return path


def listen_host(host: str) -> str:
    """``host`` when this machine can listen on it (binding port 0 on one of its addresses); ValueError saying why
    not, so an address that does not resolve is not reported later as a taken port."""
    try:
        addresses = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:  # socket.gaierror: the name does not resolve
        raise ValueError(f"not a usable address: {e.strerror or e}") from None
    problem: Optional[OSError] = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind(address)
            return host
        except OSError as e:  # an address of another machine
            problem = problem or e
    raise ValueError(f"not a usable address: {problem.strerror if problem else 'no address'}")


def _repository(args: argparse.Namespace) -> pathlib.Path:
    from trtserve.server.examples import REPOSITORY

    if args.model_repository is None:
        return REPOSITORY.resolve()
    return checked(args, "model_repository", folder)


def _tls(args: argparse.Namespace) -> Optional[TlsOptions]:
    """TLS from the certificate, key and CA options, each file read and the PEM checked before anything starts."""
    from trtserve.server.frontend.security import TlsOptions

    cert, key = args.grpc_server_cert, args.grpc_server_key
    if (cert is None) != (key is None):
        have, lack = ("grpc_server_cert", "grpc_server_key") if key is None else ("grpc_server_key", "grpc_server_cert")
        raise OptionError(f"{written(args, have)}: needs {either(lack)} too: a certificate and its key go together")
    if cert is None:
        if args.grpc_root_cert is not None:
            raise OptionError(f"{written(args, 'grpc_root_cert')}: mutual TLS needs {either('grpc_server_cert')} and "
                              f"{either('grpc_server_key')}")
        return None
    for dest in ("grpc_server_cert", "grpc_server_key", "grpc_root_cert"):
        if getattr(args, dest) is not None:
            checked(args, dest, readable)
    _check_pem(args)
    return TlsOptions(cert, key, args.grpc_root_cert)


def _check_pem(args: argparse.Namespace) -> None:
    """The files parse as the TLS library needs them: a certificate and its matching key, a CA bundle."""
    import ssl

    from trtserve.server.tls import server_context

    try:  # the context the HTTP port will build: a password-protected key fails here, it prompts nobody
        server_context(args.grpc_server_cert, args.grpc_server_key)
    except ssl.SSLError as e:
        raise OptionError(f"{written(args, 'grpc_server_cert')} with {written(args, 'grpc_server_key')}: not a PEM "
                          f"certificate and its private key ({_ssl_reason(e)})") from None
    if args.grpc_root_cert is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(str(args.grpc_root_cert))
        except ssl.SSLError as e:
            raise OptionError(f"{written(args, 'grpc_root_cert')}: not a PEM CA certificate "
                              f"({_ssl_reason(e)})") from None


def _ssl_reason(e: Exception) -> str:
    """OpenSSL's reason, without the source line of Python's ssl module."""
    return getattr(e, "reason", None) or re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(e.args[-1] if e.args else e))


def _token(args: argparse.Namespace) -> Optional[str]:
    """The bearer token of --auth-token-file, else of TRTSERVE_AUTH_TOKEN (unset or empty: none). Messages never
    show it: it is a secret."""
    if args.auth_token_file is not None:
        raw = checked(args, "auth_token_file", readable).decode("latin-1")
        where = written(args, "auth_token_file")
    else:
        raw, where = os.environ.get("TRTSERVE_AUTH_TOKEN", ""), "TRTSERVE_AUTH_TOKEN"
        if not raw:
            return None
    token = raw.strip()
    if not token:
        raise OptionError(f"{where}: holds no token (only white space)")
    if not all("!" <= c <= "~" for c in token):  # what a client can send in one Authorization header
        raise OptionError(f"{where}: a bearer token must be printable ASCII without spaces (not shown here)")
    return token


def _model_control(args: argparse.Namespace, options: ServerOptions) -> None:
    """Sets the model-control options from the flags; OptionError for a combination Triton refuses."""
    names = args.load_model
    if names is None:
        names = [n.strip() for n in _env("LOAD_MODEL", "").split(",") if n.strip()]
    if names and args.model_control_mode != "explicit":
        raise OptionError(f"{written(args, 'load_model')}: needs --model-control-mode explicit (the mode is "
                          f"{args.model_control_mode}, which loads every model at start)")
    if "*" in names and len(names) > 1:
        raise OptionError(f"{written(args, 'load_model')}: '*' loads every model and must be the only model named")
    options.model_control_mode = args.model_control_mode
    options.startup_models = tuple(names)
    options.repository_poll_secs = args.repository_poll_secs


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The ServerOptions of ``trtserve serve``, every value checked before anything starts: OptionError names the
    flag or variable of the first bad one."""
    from trtserve.server.app import ServerOptions

    for dest, check in RANGES.items():
        checked(args, dest, check)
    options = ServerOptions(
        model_repository=_repository(args), host=checked(args, "host", listen_host), grpc_port=args.grpc_port,
        http_port=None if args.http_port < 0 else args.http_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, max_message_bytes=args.max_message_bytes,
        drain_seconds=args.drain_seconds,
        cache_dir=(checked(args, "cache_dir", plan_cache) if args.cache_dir is not None
                   else pathlib.Path(os.path.expanduser("~/.cache/trtserve"))),
        gpu_metrics=not args.no_gpu_metrics,
    )
    options.tls = _tls(args)
    options.auth_token = _token(args)
    if args.metrics_tls and options.tls is None:
        raise OptionError(f"{written(args, 'metrics_tls')}: needs {either('grpc_server_cert')} and "
                          f"{either('grpc_server_key')}")
    if args.metrics_auth and options.auth_token is None:
        raise OptionError(f"{written(args, 'metrics_auth')}: needs a token: {either('auth_token_file')}, or "
                          "TRTSERVE_AUTH_TOKEN")
    options.metrics_tls, options.metrics_auth = args.metrics_tls, args.metrics_auth
    options.max_concurrent_streams = args.max_concurrent_streams
    options.engine_cpus = checked(args, "engine_cpus", placement.engine_cpus) if args.engine_cpus else None
    spare = max(1, usable_cpus() - len(options.engine_cpus)) if options.engine_cpus else None
    options.frontends = checked(args, "frontends", lambda value: frontends_from(value, spare))
    if options.engine_cpus and options.frontends == 0:
        raise OptionError(f"{written(args, 'engine_cpus')}: needs front-end processes ({written(args, 'frontends')} "
                          "serves from one process)")
    options.frontend_scheduling = args.frontend_scheduling
    options.event_loop = checked(args, "event_loop", loops.resolve)
    options.arena_bytes = args.arena_bytes
    options.frontend_max_memory_bytes = args.frontend_max_memory_mib << 20
    options.watchdog_seconds = args.watchdog_seconds
    options.max_inflight = args.max_inflight
    options.max_stream_inflight = args.max_stream_inflight
    options.max_shm_regions = args.max_shm_regions
    options.exit_on_error = args.exit_on_error
    options.strict_readiness = args.strict_readiness
    options.lenient_config = args.lenient_config
    _model_control(args, options)
    return options


async def _serve(options: ServerOptions) -> int:
    from trtserve.server.app import TrtServer

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
    CPU quota; ``cpus``: those left to the front ends), but two from two CPUs up, and at most eight
    (docs/architecture.md gives the measurements). ValueError for anything else."""
    if value == "auto":
        cpus = usable_cpus() if cpus is None else cpus
        return min(8, max(min(2, cpus), cpus // 2))
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError("must be auto or a number >= 0")
    return count


def _switch_interval_us(value: str) -> float:
    """The --gil-switch-interval-us value in us (0: leave Python's); ``auto`` asks whether TensorRT can run here.
    ValueError for anything else."""
    if value == "auto":
        from trtserve.server.engine.backends.tensorrt import compat

        return DEFAULT_GIL_SWITCH_INTERVAL_US if compat.available()[0] else 0.0
    try:
        interval = float(value)
    except ValueError:
        interval = -1.0
    if interval < 0:
        raise ValueError("must be auto or a number >= 0")
    return interval


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    interval = checked(args, "gil_switch_interval_us", _switch_interval_us)
    options = server_options(args)
    if interval > 0:
        sys.setswitchinterval(interval / 1e6)
    from trtserve.server.engine.host import StartupFailure
    from trtserve.server.supervisor import StartError

    try:
        return loops.run(lambda: _serve(options), options.event_loop)
    except OSError as e:  # a port that is taken: one line, not a traceback
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


# GRPC_EXPERIMENTS per subcommand where the user has not set it (see _grpc_experiments)
BENCH_GRPC_EXPERIMENTS = "-event_engine_client"
SERVE_GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints,-event_engine_client"


def _grpc_experiments(argv: List[str]) -> None:
    """gRPC's EventEngine I/O off for ``trtserve serve`` and ``trtserve bench``, unless GRPC_EXPERIMENTS is already
    set (the user's choice, even an empty one, stands).

    - ``serve``: with EventEngine's listener and endpoints (grpcio's default) gRPC reads and writes the sockets on a
      thread pool of its own and hands every event to the thread that polls the completion queue, which hands it to
      the event loop; without them the polling thread does the I/O itself, a hand-off between threads less per event.
      A grpc.aio server then spends less CPU per call and serves more where that is the limit (measured beside each
      other: docs/architecture.md, "gRPC's I/O"). Front-end processes inherit the variable; so does the
      single-process mode's gRPC server.
    - ``bench``: with the EventEngine client every blocking call's completion passes between gRPC's own threads and
      the caller's: 4 voluntary context switches per call against 1 without it, and 50-120 us more client CPU
      (``python -m bench.client_floor``). A load generator should add as little of its own to the latency it
      reports as it can (issue #6: agree with perf_analyzer at concurrency 1).

    gRPC reads the variable once, when it is imported, so this runs before anything imports grpc; the library API is
    left as it is."""
    value = grpc_experiments_for(argv[0] if argv else "")
    if value is not None:
        os.environ["GRPC_EXPERIMENTS"] = value


def grpc_experiments_for(command: str) -> Optional[str]:
    """The GRPC_EXPERIMENTS value ``trtserve COMMAND`` sets (``_grpc_experiments``); None where it sets none: another
    command, a variable the user set, or a grpcio release it was not measured on."""
    value = {"serve": SERVE_GRPC_EXPERIMENTS, "bench": BENCH_GRPC_EXPERIMENTS}.get(command)
    if value is None or "GRPC_EXPERIMENTS" in os.environ:
        return None
    release = _grpcio_release()
    # the releases this was measured on (1.80 and 1.85) carry these experiments; a test fails on one that does not
    return value if release is not None and release >= (1, 80) else None


def _grpcio_release() -> Optional[Tuple[int, int]]:
    """grpcio's (major, minor) without importing grpc (which would read GRPC_EXPERIMENTS): from the package's
    metadata, or from the version file grpcio installs (a site without metadata, such as the GPU kit's); None when
    neither says."""
    text = None
    try:
        from importlib.metadata import version

        text = version("grpcio")
    except Exception:  # noqa: BLE001 - no metadata
        import importlib.util

        spec = importlib.util.find_spec("grpc")  # finds the package without running it
        if spec is not None and spec.submodule_search_locations:
            path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_grpcio_metadata.py"
            try:
                found = re.search(r"(\d+\.\d+)", path.read_text())
                text = found.group(1) if found else None
            except OSError:
                text = None
    try:
        major, minor = (int(x) for x in (text or "").split(".")[:2])
    except ValueError:
        return None
    return major, minor


def main(argv: Optional[List[str]] = None) -> int:
    _grpc_experiments(list(sys.argv[1:] if argv is None else argv))
    try:
        parser = build_parser()  # reads the variables, so even --help reports a bad one
        args, extra = parser.parse_known_args(argv)
        if extra:  # the subcommand's own usage, not the program's
            sub = _subparser(parser, getattr(args, "command", None))
            (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.func(args) or 0)
    except OptionError as e:  # serve checks its options before anything starts: one line
        print(f"trtserve: {e}", file=sys.stderr)
        return 2


def _subparser(parser: argparse.ArgumentParser, name: Optional[str]) -> Optional[argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return None


if __name__ == "__main__":
    sys.exit(main())
