"""--event-loop: which asyncio loop every server process runs (server/process/loops.py)."""
from __future__ import annotations

import asyncio
import builtins
import json
import urllib.request

import pytest

from tests.mp import Serve
from trtserve.server.examples import REPOSITORY as EXAMPLE
from trtserve.server.process import loops

uvloop = pytest.importorskip("uvloop")  # a dependency wherever it installs (not on Windows)


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "uvloop" or name.startswith("uvloop."):
            raise ImportError("no uvloop here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


def test_auto_takes_uvloop_where_installed_and_asyncio_where_not(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loops.resolve("auto") == "uvloop"
    assert loops.resolve("asyncio") == "asyncio" and loops.resolve("uvloop") == "uvloop"
    _without_uvloop(monkeypatch)
    assert loops.resolve("auto") == "asyncio"
    with pytest.raises(loops.LoopError, match="uvloop is not installed"):
        loops.resolve("uvloop")
    with pytest.raises(loops.LoopError, match="unknown event loop 'trio'"):
        loops.resolve("trio")


@pytest.mark.parametrize("choice, module", [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_run_runs_the_coroutine_on_the_loop_named(choice: str, module: str) -> None:
    async def which() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    assert loops.run(which, choice).split(".")[0] == module


def test_serve_refuses_uvloop_where_it_is_missing_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from trtserve import cli

    _without_uvloop(monkeypatch)
    args = cli.build_parser().parse_args(["serve", "--event-loop", "uvloop"])
    with pytest.raises(cli.OptionError, match=r"^--event-loop uvloop: uvloop is not installed"):
        cli.server_options(args)


def _maps_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension loaded: a process on asyncio's loop never imports it."""
    with open(f"/proc/{pid}/maps") as f:
        return "uvloop" in f.read()


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_every_process_runs_the_loop_chosen_and_serves(choice: str) -> None:
    s = Serve(EXAMPLE, frontends=2, args=["--event-loop", choice], metrics=False)
    try:
        roles = s.roles()
        pids = [s.proc.pid, roles["engine"], *roles["frontend"]]
        assert len(pids) == 4
        assert [_maps_uvloop(pid) for pid in pids] == [choice == "auto"] * 4
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 64],
                                       "data": [0.5] * 128}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{s.http_port}/v2/models/mlp/infer", data=body), timeout=10) as r:
            out = json.loads(r.read())
        assert out["outputs"][0]["shape"] == [2, 16]
    finally:
        assert s.stop() == 0
