"""Issue 19 item 7: the docs say what the code does. Every link in the README and docs/ leads to a file of the
repository; docs/metrics.md lists exactly the metrics a running server exports (name, type, labels, buckets); the
GPU extras pin TensorRT and CuPy to one CUDA major each; ServerMetadata advertises exactly the extensions
docs/http.md names, and each of them answers."""
from __future__ import annotations

import fnmatch
import pathlib
import re
import urllib.request
from typing import Dict, Iterator, List, Set, Tuple

import numpy as np
import pytest

from tests import models
from tests.conftest import RunningServer
from trtserve.server.metrics.prometheus import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# a markdown link or image: [text](target "title"), and reference definitions: [name]: target
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"(?:href|src)=\"([^\"]+)\"")
BARE_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)>`\"']+", re.I)
# example addresses of a server the reader starts themselves, not places to visit
LOCAL_URL = re.compile(r"^[a-z]+://(localhost|127\.0\.0\.1|0\.0\.0\.0|<host>|\[::1\])(:\d+|:<[a-z]+>)?(/|$)", re.I)


def _text_outside_code(path: pathlib.Path) -> str:
    """The page without fenced code blocks: links are written in the prose (a block's brackets are code)."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


def _links(path: pathlib.Path) -> List[str]:
    text = _text_outside_code(path)
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text) + HTML_LINK.findall(text)


def _is_url(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None


@pytest.mark.parametrize("page", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_leads_to_a_file_of_the_repository(page: pathlib.Path) -> None:
    broken = []
    for target in _links(page):
        path = target.split("#", 1)[0]
        if _is_url(target) or not path:  # an address elsewhere, or an anchor on this page
            continue
        resolved = (page.parent / path).resolve()
        if ROOT not in resolved.parents or not resolved.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_links_are_found() -> None:
    """The link patterns see the links these pages are known to have (a pattern that matched nothing would pass
    the test above)."""
    readme = _links(ROOT / "README.md")
    assert {"docs/http.md", "docs/bench-mlp.png", "LICENSE", "docs/client.md#perf_analyzer"} <= set(readme)
    assert "../client_bench_mlp.png" in _links(ROOT / "docs" / "benchmarks" / "client.md")


def test_the_readme_refers_only_to_the_repository() -> None:
    """No link or address in the README leads outside the repository; addresses of the server the reader starts
    (localhost) are examples, not references."""
    text = (ROOT / "README.md").read_text()
    outside = [t for t in _links(ROOT / "README.md") if _is_url(t) and not LOCAL_URL.match(t)]
    outside += [u for u in BARE_URL.findall(text) if not LOCAL_URL.match(u)]
    assert not outside, outside


# ---- docs/metrics.md against the metrics a server exports ---------------------------------------------------------
Exported = Dict[str, Tuple[str, Set[str]]]  # name as a query spells it -> (type, label names)


def _doc_sections() -> Dict[str, Exported]:
    """docs/metrics.md's tables by section title: each row's name, type and labels (the section's, plus the
    row's "extra label `x`")."""
    sections: Dict[str, Exported] = {}
    for block in re.split(r"^## ", (ROOT / "docs" / "metrics.md").read_text(), flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        base = set(re.findall(r"`(\w+)`", re.search(r"\(labels? ([^;)]*)", title).group(1)))
        rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (.*) \|$", body, re.M)
        sections[title] = {name: (kind, base | set(re.findall(r"extra label `(\w+)`", meaning)))
                           for name, kind, meaning in rows}
    return sections


def _doc_buckets() -> Dict[str, Tuple[float, ...]]:
    """docs/metrics.md's bucket list: {name pattern: upper bounds}."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    return {pattern: tuple(float(x) for x in re.findall(r"\d+(?:\.\d+)?", numbers))
            for pattern, numbers in re.findall(r"^- `([\w*]+)`: ([\d.,\s]+)", text, re.M)}


def _scraped(text: str) -> Tuple[Exported, Dict[str, Set[float]]]:
    """Prometheus text as a query sees it: {name: (type, label names)} from the TYPE lines and the samples (a
    histogram's ``le`` left out), and each histogram's finite bucket bounds."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    labels: Dict[str, Set[str]] = {name: set() for name in types}
    bounds: Dict[str, Set[float]] = {name: set() for name, kind in types.items() if kind == "histogram"}
    for name, body in re.findall(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? \S+$", text, re.M):
        family = name if name in types else re.sub(r"_(bucket|sum|count)$", "", name)
        pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body or ""))
        le = pairs.pop("le", None)
        if le is not None and le != "+Inf":
            bounds[family].add(float(le))
        labels[family] |= set(pairs)
    return {name: (kind, labels[name]) for name, kind in types.items()}, bounds


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    """The example model on a server of this module's own: these tests infer, which the shared example_server's
    readers of statistics must not see."""
    repo = tmp_path_factory.mktemp("docs_repo")
    models.copy_example(repo, "mlp")
    s = RunningServer(repo)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def scrape(server: RunningServer) -> str:
    """/metrics after one answered request (so every per-model series has samples)."""
    from trtserve.client import InferenceClient

    with InferenceClient(server.url) as client:
        client.infer("mlp", {"INPUT0": np.ones((2, 64), np.float32)})
    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        return r.read().decode()


def _section(prefix: str) -> Exported:
    matches = [rows for title, rows in _doc_sections().items() if title.startswith(prefix)]
    assert len(matches) == 1, list(_doc_sections())
    return matches[0]


def test_docs_list_exactly_the_metrics_a_server_exports(scrape: str) -> None:
    """Per model version and of the server's processes: every series /metrics has is in one of the two tables, with
    its type and labels, and nothing else is."""
    exported, _ = _scraped(scrape)
    per_model, processes = _section("Per model version"), _section("Server processes")
    assert not set(per_model) & set(processes)
    documented = {**per_model, **processes}
    assert sorted(exported) == sorted(documented), "docs/metrics.md and /metrics differ"
    for name, (kind, labels) in exported.items():
        assert documented[name] == (kind, labels), name


def test_docs_list_exactly_the_gpu_metrics() -> None:
    """NVML is faked (the calls gpu.py makes, tests/test_metrics_unit.py), so this runs without a GPU."""
    from prometheus_client import CollectorRegistry

    from tests.test_metrics_unit import _FakeNvml
    from trtserve.server.metrics.gpu import nvml_collector
    from trtserve.server.metrics.http import render

    registry = CollectorRegistry(auto_describe=False)
    registry.register(nvml_collector(_FakeNvml(count=1)))
    exported, _ = _scraped(render(registry).decode())  # what /metrics serves
    assert exported == _section("GPU")


def test_docs_state_the_histogram_buckets(scrape: str) -> None:
    buckets = _doc_buckets()
    assert buckets == {"*_duration_seconds": LATENCY_BUCKETS_S, "trtserve_batch_size": BATCH_SIZE_BUCKETS}
    exported, bounds = _scraped(scrape)
    assert len(bounds) == 4
    for name, got in bounds.items():
        stated = [b for pattern, b in buckets.items() if fnmatch.fnmatchcase(name, pattern)]
        assert len(stated) == 1 and got == set(stated[0]), name


# ---- packaging -----------------------------------------------------------------------------------------------------
def _pyproject() -> dict:
    try:
        import tomllib  # novermin - Python 3.11+; pytest brings the tomli backport below it
    except ImportError:
        tomllib = pytest.importorskip("tomli")  # 3.9 and 3.10: only where the backport is installed
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


@pytest.mark.parametrize("major", ["12", "13"])
def test_each_gpu_extra_pins_tensorrt_and_cupy_to_one_cuda_major(major: str) -> None:
    names = [_name(r) for r in _pyproject()["project"]["optional-dependencies"][f"gpu-cu{major}"]]
    assert [n for n in names if n.startswith("tensorrt")] == [f"tensorrt-cu{major}"], names
    assert [n for n in names if n.startswith("cupy")] == [f"cupy-cuda{major}x"], names
    # nothing in it is built for another CUDA major
    assert all(re.findall(r"cu(?:da)?(\d\d)", n) in ([], [major]) for n in names), names


def test_gpu_is_gpu_cu12() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["gpu"] == ["trtserve[gpu-cu12]"] or sorted(extras["gpu"]) == sorted(extras["gpu-cu12"])


# ---- ServerMetadata extensions -------------------------------------------------------------------------------------
def _documented_extensions() -> Tuple[List[str], List[str]]:
    """(always, only with a GPU): the extensions docs/http.md says ServerMetadata lists."""
    text = (ROOT / "docs" / "http.md").read_text()
    sentence = re.search(r"`extensions` \(here and in gRPC's `ServerMetadata`\) lists what works: (.*?)\n\n",
                         text, re.S).group(1)
    always, _, gpu = sentence.partition(", and ")
    return re.findall(r"`(\w+)`", always), re.findall(r"`(\w+)`", gpu)


def test_server_metadata_lists_exactly_what_works(server: RunningServer) -> None:
    """The live list equals docs/http.md's (cuda_shared_memory only with a GPU), and each extension that has
    calls answers them."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from trtserve.server.engine.shm.registry import SharedMemoryRegistry

    always, gpu = _documented_extensions()
    assert gpu == ["cuda_shared_memory"]
    client = grpcclient.InferenceServerClient(server.url)
    try:
        listed = list(client.get_server_metadata().extensions)
        with_gpu = SharedMemoryRegistry().cuda_device_count() > 0
        assert listed == always + (gpu if with_gpu else [])
        assert client.get_model_config("mlp").config.name == "mlp"  # model_configuration
        assert client.get_model_config("mlp").config.HasField("dynamic_batching")  # schedule_policy
        assert [m.name for m in client.get_model_repository_index().models] == ["mlp"]  # model_repository
        assert client.get_inference_statistics("mlp").model_stats[0].name == "mlp"  # statistics
        assert "log_verbose_level" in client.get_log_settings().settings  # logging
        assert "trace_level" in client.get_trace_settings().settings  # trace
        client.get_system_shared_memory_status()  # system_shared_memory
        x = grpcclient.InferInput("INPUT0", [1, 64], "FP32")
        x.set_data_from_numpy(np.ones((1, 64), np.float32))
        top = client.infer("mlp", [x], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)])
        assert top.as_numpy("OUTPUT0").shape == (1, 2)  # classification: "value:index" strings
    finally:
        client.close()
    http = httpclient.InferenceServerClient(server.http_url)
    try:  # binary_tensor_data: the output comes back as raw bytes after the JSON header
        x = httpclient.InferInput("INPUT0", [1, 64], "FP32")
        x.set_data_from_numpy(np.ones((1, 64), np.float32), binary_data=True)
        out = http.infer("mlp", [x], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)])
        assert out.get_output("OUTPUT0")["parameters"]["binary_data_size"] == 16 * 4
    finally:
        http.close()

