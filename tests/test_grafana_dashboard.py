"""The Grafana dashboard `deploy/grafana/pipeserve.json`: a well-formed dashboard model whose every PromQL
expression parses (promql-parser, the Prometheus parser's Rust port), and, against `pipeserve serve -pp 2`,
every metric it names is in /metrics with every label it groups or filters by."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from helpers import tiny_with_tokenizer
from prometheus_client.parser import text_string_to_metric_families
from server_utils import start_server

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pipeserve.json"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
GRID_WIDTH = 24
PANEL_TYPES = {"row", "stat", "timeseries", "heatmap"}
# Grafana's own variables that stand for a duration inside [...]; the dashboard's variables stand in label matchers.
DURATION_VARIABLES = {"__rate_interval", "__interval", "__range"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus at scrape time, not in /metrics

# What the dashboard must show: throughput, requests, latency histograms, queues, KV use, prefix-cache hits,
# stage busy, restarts, recovery time, recomputed requests.
REQUIRED_METRICS = {
    "pipeserve_prompt_tokens_total", "pipeserve_generation_tokens_total", "pipeserve_request_success_total",
    "pipeserve_time_to_first_token_seconds_bucket", "pipeserve_inter_token_latency_seconds_bucket",
    "pipeserve_e2e_request_latency_seconds_bucket", "pipeserve_num_requests_running",
    "pipeserve_num_requests_waiting", "pipeserve_kv_blocks_used", "pipeserve_kv_blocks_total",
    "pipeserve_kv_blocks_cached", "pipeserve_prefix_cache_hits_total", "pipeserve_prefix_cache_queries_total",
    "pipeserve_stage_busy_seconds_total", "pipeserve_pipeline_busy_seconds_total", "pipeserve_stage_restarts_total",
    "pipeserve_recovery_seconds_bucket", "pipeserve_recovery_seconds_count", "pipeserve_requests_recomputed_total",
}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def variable_names(dash: dict) -> set[str]:
    return {v["name"] for v in dash["templating"]["list"]}


def expressions(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, Prometheus annotation and `label_values` variable query."""
    found = [(f"panel {p['title']!r} {t['refId']}", t["expr"])
             for p in dash["panels"] for t in p.get("targets", [])]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = LABEL_VALUES.match(v["query"]["query"])
            assert m, f"variable {v['name']}: expected label_values(selector, label), got {v['query']!r}"
            found.append((f"variable {v['name']!r}", m.group(1)))
    return found


def expand(expr: str, defined: set[str]) -> str:
    """The expression as Prometheus receives it: durations for Grafana's interval variables, a regex for ours."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name in DURATION_VARIABLES:
            return "5m"
        assert name in defined, f"${name} is not a variable of the dashboard"
        return ".*"
    return VARIABLE.sub(value, expr)


def metric_labels(expr: promql_parser.Expr) -> dict[str, set[str]]:
    """Each metric the expression selects, with the labels it filters on or groups by (`by (...)`)."""
    needs: dict[str, set[str]] = defaultdict(set)

    def selectors(node: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
        out: list = []
        promql_parser.walk(node, lambda n: out.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
        return out

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name: {node.prettify()}"
            needs[node.name] |= {m.name for m in node.matchers.matchers}
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None \
                and node.modifier.type == promql_parser.AggModifierType.By:
            for sel in selectors(node.expr):
                needs[sel.name] |= set(node.modifier.labels)

    promql_parser.walk(expr, visit)
    return {name: labels - SCRAPE_LABELS for name, labels in needs.items()}


def legends(dash: dict) -> list[tuple[str, set[str], set[str]]]:
    """(where, labels it shows ({{label}}, an annotation's tags), metrics its expression names) for every
    panel target and Prometheus annotation."""
    defined = variable_names(dash)

    def names(expr: str) -> set[str]:
        return set(metric_labels(promql_parser.parse(expand(expr, defined))))
    found = [(f"panel {p['title']!r} {t['refId']}", set(LEGEND_LABEL.findall(t["legendFormat"])) - {"le"},
              names(t["expr"])) for p in dash["panels"] for t in p.get("targets", [])]
    found += [(f"annotation {a['name']!r}", set(LEGEND_LABEL.findall(a["titleFormat"])) |
               {k for k in a["tagKeys"].split(",") if k}, names(a["expr"]))
              for a in dash["annotations"]["list"] if "expr" in a]
    return found


def dashboard_metrics(dash: dict) -> dict[str, set[str]]:
    """Every metric the dashboard names (sample names as exposed: `_total`, `_bucket`, ...) with its labels."""
    defined = variable_names(dash)
    needs: dict[str, set[str]] = defaultdict(set)
    for where, expr in expressions(dash):
        try:
            parsed = promql_parser.parse(expand(expr, defined))
        except ValueError as e:
            raise AssertionError(f"{where}: {expr!r} does not parse: {e}") from e
        for name, labels in metric_labels(parsed).items():
            needs[name] |= labels
    return dict(needs)


# ---- the dashboard model ---------------------------------------------------------------------------------


def test_dashboard_model():
    dash = load_dashboard()
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 39
    assert {"name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}.items() <= \
        dash["__inputs"][0].items()
    ds_var = next(v for v in dash["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"  # provisioned copies resolve it too
    required = {r["id"] for r in dash["__requires"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), ids
    for p in dash["panels"]:
        assert p["type"] in PANEL_TYPES and (p["type"] == "row" or p["type"] in required), p["type"]
        pos = p["gridPos"]
        assert all(isinstance(pos[k], int) for k in "hwxy") and pos["x"] + pos["w"] <= GRID_WIDTH, p["title"]
        if p["type"] == "row":
            assert not p["collapsed"] and p["panels"] == []
            continue
        assert p["datasource"] == DATASOURCE and p["targets"] and p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"].strip() for t in p["targets"]), p["title"]
    for v in dash["templating"]["list"]:
        assert v["type"] == "datasource" or v["datasource"] == DATASOURCE, v["name"]
    for a in dash["annotations"]["list"]:
        assert "expr" not in a or a["datasource"] == DATASOURCE, a["name"]


def test_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in load_dashboard()["panels"]:
        pos = p["gridPos"]
        for y in range(pos["y"], pos["y"] + pos["h"]):
            for x in range(pos["x"], pos["x"] + pos["w"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} at x={x} y={y}"
                cells[(x, y)] = p["title"]


def test_every_expression_parses_and_names_the_required_metrics():
    names = dashboard_metrics(load_dashboard())
    assert REQUIRED_METRICS <= names.keys(), REQUIRED_METRICS - names.keys()
    assert all(n.startswith("pipeserve_") for n in names), names
    assert names["pipeserve_request_success_total"] == {"finished_reason"}
    assert names["pipeserve_stage_restarts_total"] == {"stage"}


def test_an_unparsable_or_unknown_expression_is_caught():
    dash = load_dashboard()
    dash["panels"][0]["targets"][0]["expr"] = "sum(rate(pipeserve_prompt_tokens_total[$__rate_interval])"
    with pytest.raises(AssertionError, match="does not parse"):
        dashboard_metrics(dash)
    dash["panels"][0]["targets"][0]["expr"] = 'pipeserve_prompt_tokens_total{job=~"$cluster"}'
    with pytest.raises(AssertionError, match=r"\$cluster is not a variable"):
        dashboard_metrics(dash)


def test_every_metric_is_documented():
    docs = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    for name in dashboard_metrics(load_dashboard()):
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{name}" in docs or f"`{family}`" in docs, f"{name} is not in docs/serving.md's metrics table"


def test_scrape_example_targets_metrics():
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "pipeserve" and job["metrics_path"] == "/metrics"
    assert all(re.fullmatch(r"[\w.-]+:\d+", t) for c in job["static_configs"] for t in c["targets"])


# ---- against a running server ----------------------------------------------------------------------------


def exposed_labels(url: str) -> dict[str, set[str]]:
    """Every sample name of /metrics with the union of its label names."""
    labels: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            labels[s.name] |= set(s.labels)
    return dict(labels)


@pytest.mark.slow
def test_every_dashboard_metric_is_served_at_pp2(tmp_path_factory):
    model = tiny_with_tokenizer(tmp_path_factory)
    log = tmp_path_factory.mktemp("grafana") / "server.log"
    args = ["-pp", "2", "--pp-layer-partition", "2,2", "--threads-per-worker", "1", "--dtype", "float32",
            "--max-model-len", "128", "--num-kv-blocks", "64", "--served-model-name", "tiny",
            "--disable-access-log"]
    server = start_server(model, log, args, api_key="grafana-key")
    try:
        for n in (5, 9, 5):  # the third repeats the first prompt: a prefix-cache lookup that hits
            body = {"model": "tiny", "prompt": [(3 + 7 * i) % 300 + 3 for i in range(n)], "max_tokens": 4,
                    "temperature": 0, "ignore_eos": True}
            resp = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers(), timeout=60)
            assert resp.status_code == 200, resp.text
        served = exposed_labels(server.url)  # /metrics is open without the key, as Prometheus scrapes it
    finally:
        server.stop()
    needs = dashboard_metrics(load_dashboard())
    missing = sorted(n for n in needs if n not in served)
    assert not missing, f"the dashboard names metrics that /metrics lacks: {missing}"
    for name, labels in needs.items():
        assert labels <= served[name], f"{name}: the dashboard uses labels {labels - served[name]} it lacks"
    for where, shown, names in legends(load_dashboard()):
        carried = set().union(*(served[n] for n in names)) | SCRAPE_LABELS
        assert shown <= carried, f"{where}: its legend shows {shown - carried}, a label none of {names} has"
