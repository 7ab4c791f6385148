"""The supervisor starts its front ends together, and a front end that fails to start stops the server's start
with every child it had started stopped again. The children here are plain sleeping processes standing in for
the engine and the front ends (``Supervisor._spawn`` replaced), so only the supervisor's own logic runs; the real
processes start in tests/test_frontends.py."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

from trtserve.server.options import ServerOptions
from trtserve.server import supervisor
from trtserve.server.supervisor import Child, StartError, Supervisor, migration_warning, own_memory

FRONTENDS = 3


def _supervisor(tmp_path, fail_index: int = -1) -> Tuple[Supervisor, List[Child], Dict[str, int]]:
    """A supervisor whose children are sleeping processes; each front end's start takes 0.3 s (a front end waits
    for its Python start and its attach), and front end ``fail_index`` fails after it."""
    sup = Supervisor(ServerOptions(model_repository=tmp_path, grpc_port=0, http_port=None, metrics_port=None,
                                   gpu_metrics=False, frontends=FRONTENDS))
    children: List[Child] = []
    starting = {"now": 0, "most": 0}

    async def spawn(role: str, index: int, reason: str = "start"):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        child = Child(role, index, proc)
        child.reason = reason  # type: ignore[attr-defined]  # what the real payload would tell the child
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


def test_own_memory_reads_this_process_and_gives_none_for_one_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert own_memory(proc.pid) is None
    assert 1 << 20 < own_memory(os.getpid()) < 64 << 30  # type: ignore[operator]


def _replacing(tmp_path, monkeypatch) -> Tuple[Supervisor, List[Child], Dict[int, int]]:
    """A supervisor of stand-in children that checks memory every 50 ms; ``memory[pid]`` is what a child holds."""
    sup, children, _ = _supervisor(tmp_path)
    sup.options.frontend_max_memory_bytes = 100 << 20
    sup.options.frontend_memory_check_s = 0.05
    sup.options.frontend_min_age_s = 0.0
    memory: Dict[int, int] = {}
    monkeypatch.setattr(supervisor, "own_memory", lambda pid: memory.get(pid, 50 << 20))
    return sup, children, memory


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_front_end_past_its_memory_limit_is_replaced_first_then_drained(tmp_path, monkeypatch) -> None:
    sup, children, memory = _replacing(tmp_path, monkeypatch)
    await asyncio.wait_for(sup.start(), 30)
    try:
        before = list(sup.frontends)
        victim = before[1]
        memory[victim.pid] = 200 << 20
        await _until(lambda: sup.replacements == 1)
        new = sup.frontends[1]
        assert new is not victim and new.proc.poll() is None
        assert new.reason == "replacement" and victim.reason == "start"  # what the engine counts them as
        assert victim.proc.poll() is not None  # drained: stopped with SIGTERM, not killed by the kernel
        assert victim.exited.result() == -15
        assert sup.frontends[0] is before[0] and sup.frontends[2] is before[2]  # only the one past its limit
        assert sup.restarts == 0  # a planned exit is not a crash
        await asyncio.sleep(0.3)
        assert sup.replacements == 1 and len(children) == 1 + FRONTENDS + 1  # the new one is under the limit
    finally:
        await asyncio.wait_for(sup.stop(1.0), 60)
    assert all(c.proc.poll() is not None for c in children)


async def test_a_front_end_that_cannot_be_replaced_keeps_serving(tmp_path, monkeypatch) -> None:
    sup, children, memory = _replacing(tmp_path, monkeypatch)
    await asyncio.wait_for(sup.start(), 30)
    spawn = sup._spawn
    attempts: List[int] = []

    async def failing(role: str, index: int, reason: str = "start"):
        attempts.append(index)
        raise StartError(f"the frontend process {index} exited with code 1 before it was ready")

    try:
        victim = sup.frontends[0]
        sup.options.frontend_min_age_s = 0.5
        victim.started -= 1.0  # up long enough
        sup._spawn = failing  # type: ignore[method-assign]
        memory[victim.pid] = 200 << 20
        await asyncio.sleep(0.3)
        assert attempts == [0]  # once, then not before it has been up its minimum age again
        assert sup.frontends[0] is victim and victim.proc.poll() is None  # the old one serves on
        assert sup.replacements == 0 and sup.restarts == 0
        sup._spawn = spawn  # type: ignore[method-assign]
        await _until(lambda: sup.replacements == 1)
        assert sup.frontends[0] is not victim and victim.proc.poll() is not None
    finally:
        await asyncio.wait_for(sup.stop(1.0), 60)
    assert all(c.proc.poll() is not None for c in children)


async def test_a_stop_during_a_restart_stops_the_new_front_end_before_the_engine(tmp_path, monkeypatch) -> None:
    """A front end restarted just as the server stops attaches to the engine; the engine must outlive it (else it
    finds the engine gone, and logs it as an error), so the stop waits for the start and stops it first."""
    sup, children, _ = _supervisor(tmp_path)
    await asyncio.wait_for(sup.start(), 30)
    order: List[str] = []
    stop = Child.stop

    async def recorded(self: Child, timeout: float) -> int:
        code = await stop(self, timeout)
        order.append(f"{self.role}-{self.index}-{self.pid}")
        return code

    monkeypatch.setattr(Child, "stop", recorded)
    victim = sup.frontends[1]
    victim.signal(9)
    await _until(lambda: len(children) == 1 + FRONTENDS + 1)  # the restart has begun: its start takes 0.3 s
    new = children[-1]
    assert new.reason == "restart"
    await asyncio.wait_for(sup.stop(1.0), 60)
    assert order[-1].startswith("engine-"), order
    assert f"frontend-1-{new.pid}" in order, order  # stopped by its own start, before the engine
    assert all(c.proc.poll() is not None for c in children)
    assert sup.restarts == 0  # it never served
