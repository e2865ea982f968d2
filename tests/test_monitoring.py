"""The Grafana dashboard asks only for series /metrics exports, and compose's monitoring profile wires
Prometheus and Grafana to the api and to the repo's dashboard.

The exported series come from the metrics module itself (services/api/metrics.py renders them), so a
metric renamed there fails here instead of leaving an empty panel.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from headrace.services.api.metrics import Metrics
from tests.test_compose import compose, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "headrace.json"
# Labels a series gains on its way into Prometheus: the scrape's own, and the replica the scrape config
# (compose) or the ServiceMonitor (Kubernetes) attaches.
SCRAPE_LABELS = {"job", "instance", "replica"}
# PromQL words that are not label names where a label list or matcher may hold them.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "sum", "max", "min", "avg",
                 "rate", "histogram_quantile", "label_values"}


def exported() -> tuple[set[str], set[str]]:
    """(sample names, label names) of every series a fresh api's /metrics exports."""
    names, labels = set(), set()
    for family in text_string_to_metric_families(Metrics("m", 4096).render().decode()):
        for sample in family.samples:
            names.add(sample.name)
            labels |= set(sample.labels)
    return names, labels


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def queries(doc: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template variables' queries."""
    exprs = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """Identifiers that name series: ours contain a colon (recording rules aside, which we do not use)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values and legend text are not names
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors: [$__rate_interval], [5m]
    return {m for m in re.findall(r"[A-Za-z_][A-Za-z0-9_]*:[A-Za-z0-9_:]*", expr)}


def label_names(expr: str) -> set[str]:
    """Labels the expression matches on ({label=~"..."}) or groups by (by (a, b))."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    names = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", expr))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for call in re.findall(r"label_values\([^,]*,\s*([A-Za-z_][A-Za-z0-9_]*)\)", expr):
        names.add(call)
    return names - _PROMQL_WORDS


def test_metric_name_extraction_finds_names_and_ignores_strings():
    expr = 'sum by (le, replica) (rate(headrace:a_bucket{model_name=~"x:y", replica=~"$r"}[$__rate_interval]))'
    assert metric_names(expr) == {"headrace:a_bucket"}
    assert label_names(expr) == {"le", "replica", "model_name"}


def test_dashboard_queries_name_only_metrics_and_labels_metrics_exports():
    names, labels = exported()
    assert names, "the metrics module exported nothing"
    exprs = queries(dashboard())
    assert exprs
    for expr in exprs:
        for name in metric_names(expr):
            assert name in names, f"{name} is not exported by /metrics: {expr}"
        for label in label_names(expr):
            assert label in labels | SCRAPE_LABELS, f"label {label!r} is not on any series: {expr}"


def test_dashboard_shows_latency_throughput_queue_kv_and_prefix_cache_per_replica():
    doc = dashboard()
    used = {name for expr in queries(doc) for name in metric_names(expr)}
    for needed in ("headrace:time_to_first_token_seconds_bucket", "headrace:inter_token_latency_seconds_bucket",
                   "headrace:generation_tokens_total", "headrace:num_requests_waiting",
                   "headrace:kv_cache_usage_perc", "headrace:prefix_cache_hits_total",
                   "headrace:prefix_cache_queries_total"):
        assert needed in used, f"no panel shows {needed}"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert "label_values(" in variables["replica"]["query"]["query"] and variables["replica"]["includeAll"]
    for panel in panels(doc):
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert 'replica=~"$replica"' in expr and 'model_name=~"$model_name"' in expr, expr
            # Percentiles come from bucket rates summed per replica before the quantile, never averaged.
            if "histogram_quantile" in expr:
                assert re.search(r"sum by \(le, replica\) \(rate\(", expr), expr
    titles = [p["title"] for p in panels(doc)]
    assert len(titles) == len(set(titles)) and len({p["id"] for p in panels(doc)}) == len(titles)


def test_engine_gauges_are_not_summed_over_api_pods():
    """Every api pod of a replica reports the scheduler's same gauges and prefix-cache totals: summing them
    would multiply by the pod count."""
    for expr in queries(dashboard()):
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_"):
            if f"headrace:{name}" in expr and "label_values" not in expr:
                assert "sum" not in expr, expr


# ---- compose --profile monitoring ---------------------------------------------------------------------------

def monitoring_services() -> dict[str, dict[str, Any]]:
    services = compose("compose.yaml")["services"]
    return {name: s for name, s in services.items() if "monitoring" in s.get("profiles", [])}


def bind_mounts(service: dict[str, Any]) -> dict[str, pathlib.Path]:
    """Container path -> repo path of the service's bind mounts (./...)."""
    out = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def test_monitoring_profile_runs_prometheus_and_grafana_only_on_request():
    services = monitoring_services()
    assert set(services) == {"prometheus", "grafana"}
    for name, service in services.items():
        assert service["profiles"] == ["monitoring"], name
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts a missing {source}"
        assert not set(service) & {"build"}, f"{name} runs its upstream image"
    assert "prometheus" not in pipeline(compose("compose.yaml"))


def test_prometheus_scrapes_every_api_and_labels_the_replica():
    prometheus = monitoring_services()["prometheus"]
    mounts = bind_mounts(prometheus)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(mounts[config_flag.split("=", 1)[1]].read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert all(static["labels"].get("replica") for static in job["static_configs"])
    apis = {alias for s in pipeline(compose("compose.yaml")).values() if s["command"][0] == "api"
            for alias in s["networks"]["default"]["aliases"]}
    ports = {str(p).rsplit(":", 1)[-1] for s in pipeline(compose("compose.yaml")).values()
             if s["command"][0] == "api" for p in s["ports"]}
    assert {t.rsplit(":", 1)[0] for t in targets} == apis
    assert {t.rsplit(":", 1)[1] for t in targets} == ports
    assert "prometheus" in monitoring_services()["grafana"]["depends_on"]


def test_grafana_provisions_the_repo_dashboard_and_the_prometheus_data_source():
    grafana = monitoring_services()["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "headrace.yaml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(pathlib.PurePosixPath(home).parent)] / pathlib.PurePosixPath(home).name == DASHBOARD
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    prometheus = monitoring_services()["prometheus"]
    published = {str(p).rsplit(":", 1)[-1] for p in prometheus["ports"]}
    assert re.fullmatch(r"http://prometheus:(\d+)", source["url"]).group(1) in published
    # Panels use the dashboard's data-source variable, so the JSON imports into any Grafana as well.
    for panel in panels(dashboard()):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in MONITORING.rglob("*.y*ml")))
def test_monitoring_config_files_are_yaml(path):
    assert isinstance(yaml.safe_load((ROOT / path).read_text()), dict)
