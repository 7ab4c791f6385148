"""Issue 19 item 6: the command line as a user meets it: --version, a subcommand's own usage on its errors, help
for every flag, TRTSERVE_* variables and flags with bad values (one line naming the one the value came from, exit 2),
bench --plot without matplotlib, Triton's --model-store.
(Taken ports and bad repositories: tests/test_startup_readiness.py.)"""
from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import sys
from typing import Dict, List, Set

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


# every TRTSERVE_* variable the CLI reads, with a value it cannot use: typed values are refused while the flags'
# defaults are read (so by any subcommand, --help included), the others by serve's checks before anything starts
BAD_ENV = {
    "TRTSERVE_GRPC_PORT": "abc", "TRTSERVE_HTTP_PORT": "80 00", "TRTSERVE_METRICS_PORT": "8002x", "TRTSERVE_DRAIN_SECONDS": "30s",
    "TRTSERVE_MAX_MESSAGE_BYTES": "1G", "TRTSERVE_ARENA_BYTES": "big", "TRTSERVE_MAX_INFLIGHT": "1e3",
    "TRTSERVE_FRONTEND_MAX_MEMORY_MIB": "1GiB", "TRTSERVE_WATCHDOG_SECONDS": "30s",
    "TRTSERVE_MAX_STREAM_INFLIGHT": "-", "TRTSERVE_MAX_SHM_REGIONS": "lots", "TRTSERVE_MAX_CONCURRENT_STREAMS": "x",
    "TRTSERVE_LOG_LEVEL": "loud", "TRTSERVE_EXIT_ON_ERROR": "maybe", "TRTSERVE_STRICT_READINESS": "2",
    "TRTSERVE_LENIENT_CONFIG": "sure", "TRTSERVE_METRICS_TLS": "y", "TRTSERVE_METRICS_AUTH": "t",
    "TRTSERVE_GPU_METRICS": "nvml", "TRTSERVE_MODEL_CONTROL_MODE": "sometimes", "TRTSERVE_REPOSITORY_POLL_SECS": "5s",
    "TRTSERVE_FRONTENDS": "abc", "TRTSERVE_FRONTEND_SCHEDULING": "fifo", "TRTSERVE_EVENT_LOOP": "trio",
    "TRTSERVE_GIL_SWITCH_INTERVAL_US": "fast", "TRTSERVE_ENGINE_CPUS": "first",
    "TRTSERVE_HOST": "999.1.1.1",
    "TRTSERVE_MODEL_REPOSITORY": "/nonexistent", "TRTSERVE_LOAD_MODEL": "mlp", "TRTSERVE_CACHE_DIR": "/proc/x",
    "TRTSERVE_AUTH_TOKEN_FILE": "/nonexistent", "TRTSERVE_AUTH_TOKEN": "two words",
    # each alone: a certificate without its key, a key without its certificate, a CA without either
    "TRTSERVE_GRPC_SERVER_CERT": "/nonexistent", "TRTSERVE_GRPC_SERVER_KEY": "/nonexistent",
    "TRTSERVE_GRPC_ROOT_CERT": "/nonexistent",
}
SECRET = {"TRTSERVE_AUTH_TOKEN"}  # named, its value never shown
AT_BUILD = {"TRTSERVE_GRPC_PORT", "TRTSERVE_DRAIN_SECONDS"}  # also checked through other subcommands and --help


def _one_line(out, prefix: str) -> str:
    """The run failed as a bad option should: exit 2, nothing on stdout, one line on stderr starting ``prefix``."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), out.stderr
    return lines[0]


@pytest.mark.parametrize("name", sorted(BAD_ENV))
def test_a_bad_variable_is_one_line_naming_it(name: str) -> None:
    value = BAD_ENV[name]
    prefix = f"trtserve: {name}: " if name in SECRET else f"trtserve: {name}={shlex.quote(value)}: "
    for args in (["models"], ["--help"]) if name in AT_BUILD else (["serve"],):
        line = _one_line(_run(args, {name: value}), prefix)
        if name in SECRET:
            assert value not in line


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, str]:
    """Files for the cases below: a file that is not PEM, an empty file, and a real certificate and key."""
    d = tmp_path_factory.mktemp("files")
    (d / "garbage.pem").write_text("not a PEM file\n")
    (d / "empty").write_text("")
    out = {"garbage": str(d / "garbage.pem"), "empty": str(d / "empty"), "dir": str(d)}
    if shutil.which("openssl") is not None:
        spawn(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"), "-out",
               str(d / "cert.pem"), "-days", "2", "-subj", "/CN=trtserve-test"], check=True, capture_output=True)
        out.update(cert=str(d / "cert.pem"), key=str(d / "key.pem"))
    return out


PAIR = {"TRTSERVE_GRPC_SERVER_CERT": "{cert}", "TRTSERVE_GRPC_SERVER_KEY": "{key}"}  # a certificate and its key
# (variables, flags, the line's start); {name} is a path from ``files``
BAD_SETTINGS = [
    # the flag wins over its variable, and the message names the one that was used
    ({"TRTSERVE_FRONTENDS": "abc"}, ["--frontends", "x y"], "--frontends 'x y': must be auto or a number >= 0"),
    ({}, ["--gil-switch-interval-us", "-1"], "--gil-switch-interval-us -1: must be auto or a number >= 0"),
    ({"TRTSERVE_ENGINE_CPUS": "0"}, ["--engine-cpus", "4096"], "--engine-cpus 4096: CPU 4096 is not among the CPUs"),
    ({"TRTSERVE_CACHE_DIR": "{garbage}"}, ["--cache-dir", "/proc/x"], "--cache-dir /proc/x: cannot create it"),
    ({}, ["--auth-token-file", "/nonexistent"], "--auth-token-file /nonexistent: cannot read it: No such file"),
    ({}, ["--host", "999.1.1.1"], "--host 999.1.1.1: not a usable address"),
    ({}, ["--model-store", "/nonexistent"], "--model-repository /nonexistent: no such folder"),
    ({}, ["--grpc-server-cert", "{garbage}"], "--grpc-server-cert {garbage}: needs --grpc-server-key"),
    ({}, ["--metrics-tls"], "--metrics-tls: needs --grpc-server-cert"),
    # numbers out of range, files that exist but cannot serve, addresses of another machine
    ({"TRTSERVE_GRPC_PORT": "70000"}, [], "TRTSERVE_GRPC_PORT=70000: must be from 0 to 65535"),
    ({"TRTSERVE_METRICS_PORT": "-2"}, [], "TRTSERVE_METRICS_PORT=-2: must be from -1 to 65535"),
    ({"TRTSERVE_MAX_MESSAGE_BYTES": str(1 << 31)}, [], f"TRTSERVE_MAX_MESSAGE_BYTES={1 << 31}: must be from 1 to"),
    ({"TRTSERVE_ARENA_BYTES": "0"}, [], "TRTSERVE_ARENA_BYTES=0: must be at least 1"),
    ({}, ["--frontend-max-memory-mib", "-1"], "--frontend-max-memory-mib -1: must be at least 0"),
    ({"TRTSERVE_WATCHDOG_SECONDS": "-1"}, [], "TRTSERVE_WATCHDOG_SECONDS=-1: must be at least 0"),
    ({"TRTSERVE_REPOSITORY_POLL_SECS": "0"}, [], "TRTSERVE_REPOSITORY_POLL_SECS=0: must be more than 0"),
    ({"TRTSERVE_HOST": "192.0.2.1"}, [], "TRTSERVE_HOST=192.0.2.1: not a usable address"),  # TEST-NET-1
    ({"TRTSERVE_MODEL_REPOSITORY": "{garbage}"}, [], "TRTSERVE_MODEL_REPOSITORY={garbage}: not a folder"),
    ({"TRTSERVE_CACHE_DIR": "{garbage}"}, [], "TRTSERVE_CACHE_DIR={garbage}: not a folder"),
    ({"TRTSERVE_AUTH_TOKEN_FILE": "{empty}"}, [], "TRTSERVE_AUTH_TOKEN_FILE={empty}: holds no token"),
    ({"TRTSERVE_AUTH_TOKEN_FILE": "{dir}"}, [], "TRTSERVE_AUTH_TOKEN_FILE={dir}: cannot read it"),
    ({"TRTSERVE_AUTH_TOKEN": " "}, [], "TRTSERVE_AUTH_TOKEN: holds no token"),
    ({"TRTSERVE_METRICS_TLS": "1"}, [], "TRTSERVE_METRICS_TLS=1: needs --grpc-server-cert"),
    ({"TRTSERVE_METRICS_AUTH": "on"}, [], "TRTSERVE_METRICS_AUTH=on: needs a token"),
    ({"TRTSERVE_LOAD_MODEL": "*,mlp", "TRTSERVE_MODEL_CONTROL_MODE": "explicit"}, [],
     "TRTSERVE_LOAD_MODEL='*,mlp': '*' loads every model"),
    ({"TRTSERVE_GRPC_SERVER_CERT": "{garbage}", "TRTSERVE_GRPC_SERVER_KEY": "/nonexistent"}, [],
     "TRTSERVE_GRPC_SERVER_KEY=/nonexistent: cannot read it"),
    ({"TRTSERVE_GRPC_SERVER_CERT": "{garbage}", "TRTSERVE_GRPC_SERVER_KEY": "{garbage}"}, [],
     "TRTSERVE_GRPC_SERVER_CERT={garbage} with TRTSERVE_GRPC_SERVER_KEY={garbage}: not a PEM certificate"),
    ({"TRTSERVE_GRPC_SERVER_CERT": "{key}", "TRTSERVE_GRPC_SERVER_KEY": "{cert}"}, [],
     "TRTSERVE_GRPC_SERVER_CERT={key} with TRTSERVE_GRPC_SERVER_KEY={cert}: not a PEM certificate"),
    (dict(PAIR, TRTSERVE_GRPC_ROOT_CERT="{garbage}"), [],
     "TRTSERVE_GRPC_ROOT_CERT={garbage}: not a PEM CA certificate"),
    (dict(PAIR, TRTSERVE_GRPC_ROOT_CERT="{empty}"), [], "TRTSERVE_GRPC_ROOT_CERT={empty}: not a PEM CA certificate"),
]


@pytest.mark.parametrize("env, args, prefix", BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_the_flag_or_variable(files: Dict[str, str], env: Dict[str, str],
                                                               args: List[str], prefix: str) -> None:
    wanted = " ".join([*env.values(), *args, prefix])
    if "{cert}" in wanted and "cert" not in files:
        pytest.skip("needs the openssl command to make a certificate")
    env = {k: v.format(**files) for k, v in env.items()}
    _one_line(_run(["serve", *[a.format(**files) for a in args]], env), f"trtserve: {prefix.format(**files)}")


class _Recording(dict):
    """A stand-in for os.environ that notes every TRTSERVE_* name looked up."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.read = set()

    def _note(self, key) -> None:
        if isinstance(key, str) and key.startswith("TRTSERVE_"):
            self.read.add(key)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._note(key)
        return super().__contains__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)


def _variables_read(monkeypatch: pytest.MonkeyPatch) -> Set[str]:
    """Every TRTSERVE_* variable the CLI reads: the names in the source of the code it runs (``_env*("NAME"``
    calls, ``TRTSERVE_NAME`` anywhere), and those looked up while ``trtserve serve``'s parser is built and its
    options checked, however the code spells them."""
    import re

    from trtserve.server import app  # noqa: F401 - imported before the environment is swapped

    root = pathlib.Path(cli.__file__).resolve().parent.parent
    read: Set[str] = set()
    for path in [root / "trtserve" / "cli.py", *(root / "server").rglob("*.py"), *(root / "client").rglob("*.py")]:
        text = path.read_text()
        read |= set(re.findall(r"TRTSERVE_[A-Z0-9_]*[A-Z0-9]", text))
        read |= {f"TRTSERVE_{m}" for m in re.findall(r'_env\w*\(\s*"(\w+)"', text)}
    env = _Recording({k: v for k, v in os.environ.items() if not k.startswith("TRTSERVE_")})
    monkeypatch.setattr(os, "environ", env)
    cli.server_options(cli.build_parser().parse_args(["serve"]))
    return read | env.read


def test_the_bad_variables_cover_every_variable_the_cli_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    read = _variables_read(monkeypatch)
    assert len(read) > 20 and read == set(BAD_ENV), (sorted(read - set(BAD_ENV)), sorted(set(BAD_ENV) - read))


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
