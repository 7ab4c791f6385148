"""The live protocol suites (tritonclient: test_server_basic; trtserve's client: test_client_live), run again
against a server with two front-end processes and an engine process: every RPC must answer as it does from
one process. The tests are imported; the fixtures below start the multi-process server instead."""
from __future__ import annotations

import pathlib
from typing import Callable, Iterator, List

import pytest

from tests.conftest import RunningServer
from tests.test_client_live import *  # noqa: F401,F403
from tests.test_server_basic import *  # noqa: F401,F403
from trtserve.server.examples import REPOSITORY as EXAMPLE_REPOSITORY

FRONTENDS = 2


@pytest.fixture(scope="module")
def example_server() -> Iterator[RunningServer]:  # noqa: F811 - this module's server: two front ends
    s = RunningServer(EXAMPLE_REPOSITORY, frontends=FRONTENDS)
    yield s
    s.stop()


@pytest.fixture
def serve_repo() -> Iterator[Callable[..., RunningServer]]:  # noqa: F811
    started: List[RunningServer] = []

    def start(repo: pathlib.Path, metrics: bool = True, drain_seconds: float = 5.0, **options) -> RunningServer:
        s = RunningServer(repo, metrics=metrics, drain_seconds=drain_seconds, frontends=FRONTENDS, **options)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def triton_client(example_server):  # noqa: F811
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(example_server.url)
    yield client
    client.close()
