"""The client's subcommands (``infer``, ``models``, ``bench``) for the ``trtserve`` CLI.

trtserve/cli.py owns the program and calls ``add_*_parser(subparsers)``; each registers its
subcommand with ``func=`` taking the parsed Namespace and returning an exit code (0 ok, 1 the
server or the connection failed, 2 bad arguments). ``python -m trtserve.client`` runs them alone.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trtserve.client._channel import INFLIGHT_PER_CHANNEL
from trtserve.client._errors import InferenceServerError
from trtserve.client.sync import InferenceClient

__all__ = ["add_bench_parser", "add_infer_parser", "add_models_parser", "main"]

DEFAULT_URL = "127.0.0.1:8001"


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL,
                   help="HOST:PORT, several comma-separated (round robin), or dns:///NAME:PORT (default %(default)s)")
    p.add_argument("--ssl", action="store_true", help="use TLS (system roots unless --root-cert)")
    p.add_argument("--root-cert", help="PEM file of the CA that signed the server certificate")
    p.add_argument("--client-cert", help="PEM client certificate chain (mutual TLS)")
    p.add_argument("--client-key", help="PEM client private key (mutual TLS)")
    p.add_argument("--server-name", help="name to check in the server certificate instead of the URL's host")
    p.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                   help="gRPC metadata sent with every call, e.g. authorization=Bearer...; repeatable")


def _connection_kwargs(args: argparse.Namespace) -> Dict[str, object]:
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--header {item!r}: expected KEY=VALUE")
        headers[key] = value
    return {"tls": True if args.ssl else None, "root_cert": args.root_cert, "client_cert": args.client_cert,
            "client_key": args.client_key, "server_name": args.server_name, "headers": headers}


def _run(fn, args: argparse.Namespace) -> int:
    """Maps failures to exit codes and one line on stderr (no tracebacks for expected errors)."""
    try:
        return fn(args)
    except InferenceServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# infer --------------------------------------------------------------------------------------------------------------

def parse_input_arg(item: str) -> Tuple[str, str, Optional[List[int]]]:
    """``NAME=file.npy`` -> (name, path, None); ``NAME=random[:D1,D2]`` -> (name, "random", dims or None)."""
    name, sep, source = item.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--input {item!r}: expected NAME=file.npy or NAME=random[:D1,D2,...]")
    if source == "random" or source.startswith("random:"):
        dims_text = source[len("random:"):] if ":" in source else ""
        try:
            dims = [int(d) for d in dims_text.split(",") if d.strip()] if dims_text else None
        except ValueError:
            raise ValueError(f"--input {item!r}: shape must be comma-separated integers") from None
        return name, "random", dims
    return name, source, None


def _infer_inputs(client: InferenceClient, args: argparse.Namespace) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    from trtserve.client.bench.inputs import TensorSpec, make_data

    meta = client.model_metadata(args.model, args.model_version)
    declared = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    arrays: Dict[str, np.ndarray] = {}
    types: Dict[str, str] = {}
    for item in args.input:
        name, source, dims = parse_input_arg(item)
        if name not in declared:
            raise ValueError(f"--input {name}: model '{args.model}' has inputs {sorted(declared)}")
        datatype, shape = declared[name]
        if source == "random":
            if dims is None:
                dims = [1 if d < 0 else d for d in shape]
            arrays[name] = make_data([TensorSpec(name, datatype, tuple(dims))], "random", args.seed)[name]
        else:
            arrays[name] = np.load(source, allow_pickle=False)
        if datatype in ("BF16", "BYTES") or arrays[name].dtype.kind in "SUO":
            types[name] = datatype
    missing = sorted(set(declared) - set(arrays))
    if missing:
        raise ValueError(f"model '{args.model}' needs input(s) {missing}: add --input NAME=random or NAME=file.npy")
    return arrays, types


def _format_array(name: str, array: np.ndarray) -> str:
    body = np.array2string(array, threshold=64, edgeitems=3, precision=6)
    return f"{name} {array.dtype} {list(array.shape)}\n{body}"


def infer_command(args: argparse.Namespace) -> int:
    """Sends one request built from files or random data and prints (and optionally saves) the outputs."""
    def go(a: argparse.Namespace) -> int:
        with InferenceClient(a.url, **_connection_kwargs(a)) as client:
            inputs, types = _infer_inputs(client, a)
            outputs = client.infer(a.model, inputs, outputs=a.output or None, version=a.model_version,
                                   timeout=a.timeout, datatypes=types or None)
        for name, array in outputs.items():
            print(_format_array(name, array))
        if a.save:
            np.savez(a.save, **outputs)
            print(f"saved {', '.join(outputs)} to {a.save}", file=sys.stderr)
        return 0

    return _run(go, args)


def add_infer_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Registers ``infer``."""
    p = subparsers.add_parser("infer", help="send one inference request and print the outputs",
                              description="Send one inference request built from .npy files or random data.")
    _add_connection_args(p)
    p.add_argument("--model", "-m", required=True, help="model to send the request to")
    p.add_argument("--model-version", default=None, help="version (default: the server's policy)")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=SOURCE",
                   help="NAME=file.npy or NAME=random[:D1,D2,...] (default shape: the model's, -1 as 1); repeatable")
    p.add_argument("--output", "-o", action="append", default=[], metavar="NAME", help="only these outputs; repeatable")
    p.add_argument("--save", metavar="OUT.npz", help="also save the outputs to this .npz file")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    p.set_defaults(func=infer_command)
    return p


# models -------------------------------------------------------------------------------------------------------------

def models_command(args: argparse.Namespace) -> int:
    """Prints every model in the repository with version, state and reason."""
    def go(a: argparse.Namespace) -> int:
        with InferenceClient(a.url, **_connection_kwargs(a)) as client:
            index = client.repository_index(ready=a.ready, timeout=a.timeout)
        rows = [(m.name, m.version or "-", m.state or "-", m.reason) for m in index]
        width = max([len("MODEL")] + [len(r[0]) for r in rows])
        print(f"{'MODEL':<{width}}  {'VERSION':<8} {'STATE':<12} REASON")
        for name, version, state, reason in rows:
            print(f"{name:<{width}}  {version:<8} {state:<12} {reason}".rstrip())
        return 0

    return _run(go, args)


def add_models_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Registers ``models``."""
    p = subparsers.add_parser("models", help="list the server's models and their state",
                              description="List the models of the server's repository with version, state and reason.")
    _add_connection_args(p)
    p.add_argument("--ready", action="store_true", help="only models that are ready")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default %(default)s)")
    p.set_defaults(func=models_command)
    return p


# bench --------------------------------------------------------------------------------------------------------------

def _levels(text: Optional[str], kind) -> List:
    if not text:
        return []
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"levels {text!r}: expected comma-separated numbers") from None


def bench_command(args: argparse.Namespace) -> int:
    """Runs the load tester and writes the table, CSV, JSON and plot asked for."""
    from trtserve.client.bench import report
    from trtserve.client.bench.inputs import parse_shapes
    from trtserve.client.bench.runner import BenchConfig, Progress, run

    def go(a: argparse.Namespace) -> int:
        if a.plot:  # before the run, not after it
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--plot needs matplotlib, which is not installed: pip install 'trtserve[plot]' "
                                 "(or pip install matplotlib)") from None
        kw = _connection_kwargs(a)
        headers = kw.pop("headers")
        concurrency = _levels(a.concurrency, int)
        rate = _levels(a.request_rate, float)
        if not concurrency and not rate:
            concurrency = [1]
        config = BenchConfig(url=a.url, model=a.model, version=a.model_version or "", concurrency=concurrency,
                             request_rate=rate, duration_s=a.duration, warmup_s=a.warmup, batch=a.batch,
                             shapes=parse_shapes(a.shape), input_data=a.input_data, timeout_s=a.timeout,
                             inflight_per_channel=a.inflight_per_channel, engine=a.engine,
                             transport=a.transport, seed=a.seed,
                             shared_memory=a.shared_memory, output_shared_memory_size=a.output_shared_memory_size,
                             processes=a.processes,
                             headers=headers,
                             tls={k: v for k, v in kw.items() if v is not None})
        result = asyncio.run(run(config, None if a.quiet else Progress()))
        print(report.format_table(result))
        for path, writer in ((a.csv, report.write_csv), (a.json, report.write_json), (a.plot, report.write_plot)):
            if path:
                writer(result, path)
                print(f"wrote {path}", file=sys.stderr)
        return 1 if all(s.requests == 0 for s in result.levels) else 0

    return _run(go, args)


def add_bench_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Registers ``bench``."""
    p = subparsers.add_parser(
        "bench", help="load-test a model: throughput and latency per concurrency or request rate",
        description="Closed loop (--concurrency: N requests in flight) or open loop (--request-rate: Poisson "
                    "arrivals, latency from the scheduled send time). Prints requests/s, rows/s and "
                    "p50/p90/p95/p99/max latency per level.")
    _add_connection_args(p)
    p.add_argument("--model", "-m", required=True, help="model to load-test")
    p.add_argument("--model-version", default=None, help="version (default: the server's policy)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", help="closed-loop levels, e.g. 1,8,32 (default 1)")
    mode.add_argument("--request-rate", help="open-loop levels in requests/s, e.g. 100,500")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per level (default %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent before each window (default %(default)s)")
    p.add_argument("--batch", "-b", type=int, default=1, help="rows per request (default %(default)s)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                   help="dims of an input with -1s, batch dimension excluded, e.g. INPUT0:64; repeatable")
    p.add_argument("--input-data", default="random", help="random, zero, or an .npz file with one array per input")
    p.add_argument("--csv", help="write one row per level to this CSV file")
    p.add_argument("--json", help="write the run and its levels to this JSON file")
    p.add_argument("--plot", help="write a PNG: latency-throughput curve and latency histogram")
    p.add_argument("--shared-memory", default="none", choices=["none", "system", "cuda"],
                   help="none: tensors in the request (default); system/cuda: inputs written once into registered "
                        "shared-memory regions, outputs returned in others (the server must support it)")
    p.add_argument("--output-shared-memory-size", type=int, default=102400,
                   help="bytes per output region when the output shape has -1 dims (default %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in seconds (default %(default)s)")
    p.add_argument("--inflight-per-channel", type=int, default=INFLIGHT_PER_CHANNEL,
                   help="requests in flight per channel, i.e. HTTP/2 connection (default %(default)s, as "
                        "perf_analyzer: a server with several front-end processes is spread by connection)")
    p.add_argument("--engine", default="auto", choices=["auto", "asyncio", "threads"],
                   help="auto (default): threads for closed-loop levels of <= 4 in flight, asyncio above; asyncio: "
                        "one event loop; threads: one thread per request in flight making blocking calls, "
                        "as perf_analyzer's sync mode (lower latency for a lone request, fewer requests/s with many "
                        "in flight)")
    p.add_argument("--transport", default="auto", choices=["auto", "h2", "grpcio"],
                   help="auto (default): h2 when --url is one HOST:PORT, grpcio otherwise; h2: the generator's own "
                        "HTTP/2 client, about a quarter of grpcio's CPU per call, so a lone request's latency is the "
                        "server's rather than the client's; grpcio: gRPC's Python client (address lists, dns:///)")
    p.add_argument("--processes", type=int, default=1,
                   help="generator processes sharing each level (one process drives about 19k requests/s on h2; "
                        "see python -m trtserve.client.bench.ceiling)")
    p.add_argument("--seed", type=int, default=0, help="seed for random data and Poisson arrivals")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    p.set_defaults(func=bench_command)
    return p


def build_parser(prog: str = "python -m trtserve.client") -> argparse.ArgumentParser:
    """A parser with the three client subcommands, for running them without the trtserve program."""
    parser = argparse.ArgumentParser(prog=prog, description="trtserve client commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_infer_parser(sub)
    add_models_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns its exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage, not the program's
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and args.command in action.choices:
                action.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)
