"""Issue 19 item 6: the command line as a user meets it: --version, a subcommand's own usage on its errors, help
for every flag, TRTSERVE_* variables with bad values, bench --plot without matplotlib, Triton's --model-store.
(Taken ports and bad repositories: tests/test_startup_readiness.py.)"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Dict, List

import pytest

from tests.conftest import spawn
from trtserve import __version__, cli


def _run(args: List[str], env: Dict[str, str] = None, timeout: float = 60):
    full = {k: v for k, v in os.environ.items() if not k.startswith("TRTSERVE_")}
    full.update(env or {})
    return spawn([sys.executable, "-m", "trtserve", *args], capture_output=True, text=True, env=full,
                 timeout=timeout)


def test_version() -> None:
    out = _run(["--version"])
    assert out.returncode == 0 and out.stdout.strip() == f"trtserve {__version__}"


@pytest.mark.parametrize("command", ["serve", "models", "infer", "bench"])
def test_an_unknown_flag_prints_the_subcommands_usage(command: str) -> None:
    required = ["--model", "m"] if command in ("infer", "bench") else []
    out = _run([command, *required, "--no-such-flag"])
    assert out.returncode == 2
    assert out.stderr.startswith(f"usage: trtserve {command} ")
    assert out.stderr.strip().splitlines()[-1] == f"trtserve {command}: error: unrecognized arguments: --no-such-flag"


def test_a_missing_argument_prints_the_subcommands_usage() -> None:
    out = _run(["infer"])
    assert out.returncode == 2 and out.stderr.startswith("usage: trtserve infer ")


def _actions(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_flag_of_every_subcommand_has_help() -> None:
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in _actions(cli.build_parser(), "trtserve")
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing
    names = {path for path, _ in _actions(cli.build_parser(), "trtserve")}
    assert names >= {"trtserve", "trtserve serve", "trtserve infer", "trtserve models", "trtserve bench"}


# every TRTSERVE_* variable the serve flags read, with a value its flag cannot take
BAD_ENV = {
    "TRTSERVE_GRPC_PORT": "abc", "TRTSERVE_HTTP_PORT": "80 00", "TRTSERVE_METRICS_PORT": "8002x", "TRTSERVE_DRAIN_SECONDS": "30s",
    "TRTSERVE_MAX_MESSAGE_BYTES": "1G", "TRTSERVE_ARENA_BYTES": "big", "TRTSERVE_MAX_INFLIGHT": "1e3",
    "TRTSERVE_MAX_STREAM_INFLIGHT": "-", "TRTSERVE_MAX_SHM_REGIONS": "lots", "TRTSERVE_MAX_CONCURRENT_STREAMS": "x",
    "TRTSERVE_LOG_LEVEL": "loud", "TRTSERVE_EXIT_ON_ERROR": "maybe", "TRTSERVE_STRICT_READINESS": "2",
    "TRTSERVE_LENIENT_CONFIG": "sure", "TRTSERVE_METRICS_TLS": "y", "TRTSERVE_METRICS_AUTH": "t",
    "TRTSERVE_GPU_METRICS": "nvml", "TRTSERVE_MODEL_CONTROL_MODE": "sometimes", "TRTSERVE_REPOSITORY_POLL_SECS": "5s",
}


@pytest.mark.parametrize("name", sorted(BAD_ENV))
def test_a_bad_variable_is_one_line_naming_it(name: str) -> None:
    for args in (["models"], ["--help"]) if name in ("TRTSERVE_GRPC_PORT", "TRTSERVE_DRAIN_SECONDS") else (["serve"],):
        out = _run(args, {name: BAD_ENV[name]})
        assert out.returncode == 2, (args, out.stderr)
        assert out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"trtserve: {name}={BAD_ENV[name]!r} is not "), out.stderr


def test_the_bad_variables_cover_every_variable_the_cli_reads() -> None:
    text = pathlib.Path(cli.__file__).read_text()
    import re

    read = {f"TRTSERVE_{m}" for m in re.findall(r'_env_(?:int|float|bool|choice)\("(\w+)"', text)}
    assert read and read <= set(BAD_ENV), read - set(BAD_ENV)


def test_good_variables_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTSERVE_GRPC_PORT", "9001")
    monkeypatch.setenv("TRTSERVE_EXIT_ON_ERROR", "0")
    monkeypatch.setenv("TRTSERVE_LENIENT_CONFIG", "true")
    args = cli.build_parser().parse_args(["serve"])
    assert args.grpc_port == 9001 and args.exit_on_error is False and args.lenient_config is True
    assert args.strict_readiness is True
    args = cli.build_parser().parse_args(["serve", "--exit-on-error", "--no-strict-readiness", "--grpc-port", "7"])
    assert args.exit_on_error is True and args.strict_readiness is False and args.grpc_port == 7


def test_model_store_is_an_alias_of_model_repository() -> None:
    args = cli.build_parser().parse_args(["serve", "--model-store", "/models"])
    assert args.model_repository == pathlib.Path("/models")


def test_bench_plot_checks_for_matplotlib_before_the_run(tmp_path: pathlib.Path) -> None:
    """Without matplotlib, --plot is refused at once (no server is even contacted: the URL is a closed port)."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from trtserve import cli\n"
            f"sys.exit(cli.main(['bench', '--url', '127.0.0.1:1', '--model', 'mlp', '--duration', '30', "
            f"'--plot', {str(tmp_path / 'x.png')!r}]))")
    out = spawn([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == ["error: --plot needs matplotlib, which is not installed: "
                                               "pip install 'trtserve[plot]' (or pip install matplotlib)"]
    assert not (tmp_path / "x.png").exists()
