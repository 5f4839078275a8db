"""k8s/observability: the alerts pass promtool's checks and a unit test each, every dashboard
expression parses, every metric they name is one the processes expose, every alert links to
its runbook, and the monitors scrape what the other kustomizations serve. Also the metrics
the alerts need: ``process_*`` on the CP and the injector, readiness, ``CP_TOKEN_MIN_TTL``
and the oidc minter's upstream token expiry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from cp_token.inject.metrics import InjectMetrics
from cp_token.inject.patch import METRICS_PORT, OPT_IN_LABEL, sidecar_container
from cp_token.metrics import Metrics
from cp_token.settings.inject import InjectSettings
from sidecar.holder import TokenHolder
from sidecar.metrics import SidecarMetrics
from tests.fakes.clock import FakeClock

ROOT = Path(__file__).resolve().parents[3]
OBSERVABILITY = ROOT / "k8s" / "observability"
RULE_TESTS = ROOT / "tests" / "promtool" / "cp-token.test.yml"
OPERATING = ROOT / "docs" / "operating.md"
RUNBOOKS = "https://github.com/ambient-code/cp-token/blob/main/docs/operating.md#"
DEV_IDENTITIES = str(ROOT / "examples" / "config" / "dev-identities.json")
# Series Prometheus itself adds to every target, not a process's
PROMETHEUS_SERIES = {"up"}

Obj = dict[str, Any]


def load(name: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all((OBSERVABILITY / name).read_text()) if d]


def alert_rules() -> list[Obj]:
    (rule,) = load("prometheusrule.yaml")
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def dashboard() -> Obj:
    loaded: Obj = json.loads((OBSERVABILITY / "cp-token-dashboard.json").read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: `make promtool` installs Debian's prometheus package"
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def write_rules(path: Path, *, annotations: bool) -> None:
    """The PrometheusRule's groups as a plain Prometheus rules file."""
    (rule,) = load("prometheusrule.yaml")
    groups = rule["spec"]["groups"]
    if not annotations:
        groups = [
            {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
            for g in groups
        ]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))


# --------------------------------------------------------------------------- promtool


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    write_rules(tmp_path / "rules.yml", annotations=True)
    done = run_promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_unit_tests_every_alert(tmp_path: Path) -> None:
    write_rules(tmp_path / "rules.yml", annotations=False)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    # each alert has a case where it fires and one where it does not
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = {r["alert"] for r in alert_rules()}
    assert names <= fires, f"no firing case for {sorted(names - fires)}"
    assert names <= quiet, f"no quiet case for {sorted(names - quiet)}"


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The harness is honest: a rule whose threshold moved fails its unit test."""
    write_rules(tmp_path / "rules.yml", annotations=False)
    rules = tmp_path / "rules.yml"
    rules.write_text(rules.read_text().replace("> 0.05", "> 0.5"))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0
    assert "CPTokenUnavailable" in done.stdout + done.stderr


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = [
        {"record": f"dashboard:panel_expr_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs)
    ]
    (tmp_path / "dashboard.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    done = run_promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- metric names


KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on"}
KEYWORDS |= {"ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names,
    strings and durations left out)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group(0).lower() in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def jobs_of(expr: str) -> dict[str, set[str]]:
    """Metric name -> the jobs its selectors name (job="a" or job=~"a|b")."""
    found: dict[str, set[str]] = {}
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        job = re.search(r'job(=~|=)"([^"]*)"', m.group(2))
        if job:
            found.setdefault(m.group(1), set()).update(job.group(2).split("|"))
    return found


def test_the_name_scan_finds_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, pod) (rate(a_bucket{job="x",le="1"}[5m])))'
        " / on (pod) group_left b_total > bool 2 and ignoring (dependency) c == 0 - time()"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert jobs_of('x{job=~"a|b"} / y{job="c"}') == {"x": {"a", "b"}, "y": {"c"}}


def exposed(text: str) -> set[str]:
    """Every sample name a text exposition can carry (families without samples yet
    included, from their TYPE lines)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def cp_exposition() -> str:
    metrics = Metrics(authn="tokenreview", minter="oidc", min_ttl=300)
    metrics.watch(ready=lambda: True, idp_token_expiry=lambda: time.time() + 600)
    metrics.request("issued", "ok", 0.01)
    metrics.kube_call("tokenreview", "201", 0.02)
    metrics.idp_call("200", 0.05)
    metrics.dependency("idp", True)
    metrics.cache("review", True)
    metrics.review_started()
    return metrics.render().decode()


def injector_exposition() -> str:
    metrics = InjectMetrics()
    metrics.request("mutated", 0.001)
    return metrics.render().decode()


def sidecar_exposition() -> str:
    return SidecarMetrics(TokenHolder(FakeClock())).render().decode()


def test_every_metric_in_alerts_and_dashboard_is_exposed_by_its_job() -> None:
    by_job = {
        "cp-token": exposed(cp_exposition()),
        "cp-token-inject": exposed(injector_exposition()),
        "cp-token-sidecar": exposed(sidecar_exposition()),
    }
    everything = set().union(*by_job.values()) | PROMETHEUS_SERIES
    exprs = [r["expr"] for r in alert_rules()] + dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        used |= names
        unknown = names - everything
        assert not unknown, f"{sorted(unknown)} exposed by no process, in: {expr}"
        for name, jobs in jobs_of(expr).items():
            if name in PROMETHEUS_SERIES:
                continue
            for job in jobs:
                assert name in by_job[job], f"job {job} does not expose {name}: {expr}"
    # the dashboard covers each process
    assert {"cp_token_requests_total", "cp_token_inject_requests_total"} <= used
    assert {"cp_token_sidecar_ready", "process_open_fds", "process_max_fds"} <= used


# --------------------------------------------------------------------------- runbooks


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def test_every_alert_links_to_its_runbook_section() -> None:
    sections = anchors(OPERATING.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url == RUNBOOKS + name.lower(), name
        assert name.lower() in sections, f"docs/operating.md has no section {name}"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_the_runbook_names_the_alerts_it_documents() -> None:
    """No runbook section for an alert that no longer exists."""
    text = OPERATING.read_text()
    documented = set(re.findall(r"^#{2,4} (CPToken\w+)$", text, re.M))
    assert documented == {r["alert"] for r in alert_rules()}


# --------------------------------------------------------------------------- the monitors


def test_service_monitors_scrape_the_metrics_ports() -> None:
    services = {}
    for directory in ("base", "injector"):
        for doc in yaml.safe_load_all((ROOT / "k8s" / directory / "service.yaml").read_text()):
            services[doc["metadata"]["name"]] = doc
    monitors = {m["metadata"]["name"]: m for m in load("servicemonitors.yaml")}
    assert set(monitors) == {"cp-token", "cp-token-inject"}
    for name, monitor in monitors.items():
        service = services[name]  # the job label is the Service's name
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
        assert port["port"] == 9090 and endpoint["scheme"] == "http"
        assert endpoint["path"] == "/metrics"


def test_the_pod_monitor_scrapes_injected_sidecars() -> None:
    (monitor,) = load("podmonitor.yaml")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["selector"]["matchLabels"] == {OPT_IN_LABEL: "true"}
    (endpoint,) = spec["podMetricsEndpoints"]
    sidecar = sidecar_container(InjectSettings(image="cp-token:1", cp_url="https://cp/token"))
    (port,) = [p for p in sidecar["ports"] if p["name"] == endpoint["port"]]
    assert port["containerPort"] == METRICS_PORT == 9099
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["SIDECAR_METRICS_ADDR"].endswith(f":{METRICS_PORT}")
    assert {"action": "replace", "targetLabel": "job", "replacement": "cp-token-sidecar"} in (
        endpoint["relabelings"]
    )


def test_the_dashboard_is_a_grafana_configmap() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl
    out = subprocess.run(
        [kubectl, "kustomize", str(OBSERVABILITY)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    (configmap,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["cp-token-dashboard.json"]) == dashboard()
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


# --------------------------------------------------------------------------- the new metrics


def test_the_cp_and_the_injector_expose_process_metrics() -> None:
    for text in (cp_exposition(), injector_exposition()):
        names = exposed(text)
        assert {"process_open_fds", "process_max_fds", "process_resident_memory_bytes"} <= names
        fds = re.search(r"^process_open_fds (\S+)$", text, re.M)
        assert fds and float(fds.group(1)) > 0
