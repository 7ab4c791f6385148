"""``trtserve infer`` and ``trtserve models`` against the real server: through the real program (subprocess)
and through the subcommand functions the program calls (``trtserve.client.cli``)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from trtserve.client import cli
from trtserve.server.examples.make_mlp import reference


def trtserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtserve", *args], capture_output=True, text=True, timeout=timeout)


def test_models_lists_version_state_reason(example_server):
    run = trtserve("models", "--url", example_server.url)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    assert lines[1].split() == ["mlp", "1", "READY"]


def test_models_shows_unavailable_reason(tmp_path, serve_repo, capsys):
    from tests import models

    models.copy_example(tmp_path)
    models.write_config(tmp_path, "broken", 'name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch_size: -3\n')
    (tmp_path / "broken" / "1").mkdir()
    s = serve_repo(tmp_path, metrics=False, exit_on_error=False)
    assert cli.main(["models", "--url", s.url]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "UNAVAILABLE" in rows["broken"] and "model.onnx" in rows["broken"]
    assert rows["mlp"].split()[1:3] == ["1", "READY"]
    assert cli.main(["models", "--url", s.url, "--ready"]) == 0
    assert "broken" not in capsys.readouterr().out


def test_infer_from_npy_prints_and_saves(example_server, tmp_path):
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    run = trtserve("infer", "--url", example_server.url, "--model", "mlp", "--input", f"INPUT0={tmp_path / 'x.npy'}",
                   "--output", "OUTPUT0", "--save", str(out))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("OUTPUT0 float32 [2, 16]\n")
    with np.load(out) as saved:
        np.testing.assert_allclose(saved["OUTPUT0"], reference(x), rtol=1e-5, atol=1e-5)


def test_infer_random_with_and_without_shape(example_server, capsys):
    assert cli.main(["infer", "--url", example_server.url, "-m", "mlp", "-i", "INPUT0=random:3,64"]) == 0
    assert capsys.readouterr().out.startswith("OUTPUT0 float32 [3, 16]")
    assert cli.main(["infer", "--url", example_server.url, "-m", "mlp", "-i", "INPUT0=random"]) == 0
    assert capsys.readouterr().out.startswith("OUTPUT0 float32 [1, 16]")  # -1 taken as 1


@pytest.mark.parametrize("args,code,message", [
    (["-m", "nope", "-i", "INPUT0=random"], 1, "[StatusCode.NOT_FOUND] model 'nope' is not loaded"),
    (["-m", "mlp", "-i", "INPUT0=random:1,3"], 1, "[StatusCode.INVALID_ARGUMENT]"),
    (["-m", "mlp", "-i", "INPUT0"], 2, "expected NAME=file.npy"),
    (["-m", "mlp", "-i", "X=random"], 2, "has inputs ['INPUT0']"),
    (["-m", "mlp"], 2, "needs input(s) ['INPUT0']"),
    (["-m", "mlp", "-i", "INPUT0=/no/such.npy"], 2, "No such file"),
])
def test_infer_errors_exit_codes(example_server, capsys, args, code, message):
    assert cli.main(["infer", "--url", example_server.url, *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_unreachable_server_exit_code(capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert cli.main(["models", "--url", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_subcommands_register_on_a_foreign_parser():
    """What trtserve/cli.py does: add_*_parser on its own subparsers, then args.func(args) -> int."""
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for add in (cli.add_infer_parser, cli.add_models_parser, cli.add_bench_parser):
        add(sub)
    args = parser.parse_args(["bench", "--model", "m", "--concurrency", "1,8", "--shape", "INPUT0:64"])
    assert args.func is cli.bench_command and args.concurrency == "1,8" and args.shape == ["INPUT0:64"]
    assert parser.parse_args(["models"]).func is cli.models_command
    assert parser.parse_args(["infer", "-m", "x"]).func is cli.infer_command
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "-m", "x", "--concurrency", "1", "--request-rate", "5"])
