"""The supervisor starts its front ends together, and a front end that fails to start stops the server's start
with every child it had started stopped again. The children here are plain sleeping processes standing in for
the engine and the front ends (``Supervisor._spawn`` replaced), so only the supervisor's own logic runs; the real
processes start in tests/test_frontends.py."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

from trtserve.server.options import ServerOptions
from trtserve.server.supervisor import Child, StartError, Supervisor, migration_warning

FRONTENDS = 3


def _supervisor(tmp_path, fail_index: int = -1) -> Tuple[Supervisor, List[Child], Dict[str, int]]:
    """A supervisor whose children are sleeping processes; each front end's start takes 0.3 s (a front end waits
    for its Python start and its attach), and front end ``fail_index`` fails after it."""
    sup = Supervisor(ServerOptions(model_repository=tmp_path, grpc_port=0, http_port=None, metrics_port=None,
                                   gpu_metrics=False, frontends=FRONTENDS))
    children: List[Child] = []
    starting = {"now": 0, "most": 0}

    async def spawn(role: str, index: int):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        child = Child(role, index, proc)
        children.append(child)
        if role == "engine":
            return child, {}
        starting["now"] += 1
        starting["most"] = max(starting["most"], starting["now"])
        await asyncio.sleep(0.3)
        starting["now"] -= 1
        if index == fail_index:
            child.signal(9)
            await child.exited
            raise StartError(f"the frontend process {index} exited with code -9 before it was ready")
        return child, {}

    sup._spawn = spawn  # type: ignore[method-assign]
    return sup, children, starting


async def test_front_ends_start_together(tmp_path) -> None:
    sup, children, starting = _supervisor(tmp_path)
    await asyncio.wait_for(sup.start(), 30)
    try:
        assert starting["most"] == FRONTENDS  # every front end's start was under way at once
        assert sorted(sup.pids()) == ["engine"] + [f"frontend-{i}" for i in range(FRONTENDS)]
    finally:
        await asyncio.wait_for(sup.stop(1.0), 60)
    assert all(c.proc.poll() is not None for c in children)


async def test_a_front_end_that_fails_to_start_fails_the_start_and_every_child_is_stopped(tmp_path) -> None:
    sup, children, _ = _supervisor(tmp_path, fail_index=1)
    with pytest.raises(StartError, match="frontend process 1"):
        await asyncio.wait_for(sup.start(), 30)
    assert len(children) == FRONTENDS + 1  # the engine and every front end had been started
    assert all(c.proc.poll() is not None for c in children), [c.proc.poll() for c in children]
    assert await asyncio.wait_for(sup.wait(), 5) == 1  # not left waiting, and no front end started again
    await asyncio.sleep(0.3)
    assert len(children) == FRONTENDS + 1


def test_migration_warning_follows_the_kernel_setting(tmp_path) -> None:
    setting = tmp_path / "tcp_migrate_req"
    setting.write_text("0\n")
    assert "tcp_migrate_req is 0" in migration_warning(2, str(setting))
    assert migration_warning(1, str(setting)) is None  # one front end: no other listener to move connections to
    setting.write_text("1\n")
    assert migration_warning(2, str(setting)) is None
    assert "cannot move connections" in migration_warning(8, str(tmp_path / "absent"))
