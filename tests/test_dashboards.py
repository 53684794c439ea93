"""Generated bundle files: fresh, consistent, and the dashboards shaped as promised.

Needs the `dashboards` extra (grafana-foundation-sdk, pinned in pyproject.toml).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

try:
    from tools.bundle.dashboards import panel_queries
    from tools.bundle.render import render
except ImportError as err:  # pragma: no cover - a setup problem, reported as such
    pytest.fail(f"grafana-foundation-sdk is not installed ({err}): pip install -e '.[dashboards]' "
                "(make setup-test)", pytrace=False)


def test_sdk_is_the_pinned_version():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dashboards"]
    pinned = next(p for p in pins if p.startswith("grafana-foundation-sdk=="))
    assert metadata.version("grafana-foundation-sdk") == pinned.split("==", 1)[1]


def test_committed_files_match_a_fresh_render():
    stale = [rel for rel, text in render().items()
             if not (ROOT / rel).exists() or (ROOT / rel).read_text(encoding="utf-8") != text]
    assert not stale, f"generated files out of date, run `make bundle`: {stale}"


def test_check_mode_fails_on_a_stale_file(tmp_path):
    for rel, text in render().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    cmd = [sys.executable, "-m", "tools.bundle", "--check", "--root", str(tmp_path)]
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    node = tmp_path / "grafana" / "dashboards" / "kubenode-node.json"
    node.write_text(node.read_text().replace("Drift by kind", "Drift by sort"))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "grafana/dashboards/kubenode-node.json" in out.stderr


def load(name: str) -> dict:
    return json.loads((ROOT / "grafana" / "dashboards" / name).read_text())


@pytest.mark.parametrize("name", ["kubenode-node.json", "kubenode-cluster.json"])
def test_variables_ids_and_datasources(name):
    model = load(name)
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "node"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "$job" in variables["node"]["query"]
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for panel in model["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)) and "" not in refs, panel["title"]
        for target in panel["targets"]:
            assert '$job' in target["expr"] or "ALERTS" in target["expr"], (panel["title"], target["expr"])


def test_node_dashboard_has_the_promised_panels():
    model = load("kubenode-node.json")
    by_title = {p["title"]: p for p in model["panels"]}
    assert by_title["Drift by kind"]["type"] == "timeseries"
    assert by_title["Drift age by kind"]["fieldConfig"]["defaults"]["unit"] == "s"
    assert by_title["Drifted services"]["type"] == "table"
    for heat in ("Network programming latency", "Proxy sync duration"):
        assert by_title[heat]["type"] == "heatmap"
        assert by_title[heat]["targets"][0]["format"] == "heatmap"
        assert "_bucket" in by_title[heat]["targets"][0]["expr"]
    assert by_title["ipset fill (entries / maxelem)"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert "children_cpu" in by_title["Exited children CPU (exec storms)"]["targets"][0]["expr"]
    assert "kubenode_process_cpu_seconds_total" in by_title["Process CPU"]["targets"][0]["expr"]
    assert "memcg_stat_read_seconds" in by_title["memory.stat read time"]["targets"][0]["expr"]
    assert "memcg_cgroups" in by_title["Memory cgroups: live and dying"]["targets"][0]["expr"]
    node_var = {v["name"]: v for v in model["templating"]["list"]}["node"]
    assert not node_var["multi"] and not node_var["includeAll"], "the node dashboard shows one node"


def test_cluster_dashboard_puts_worst_nodes_first():
    model = load("kubenode-cluster.json")
    bars = [p for p in model["panels"] if p["type"] == "bargauge"]
    assert len(bars) >= 6
    for panel in bars:
        expr = panel["targets"][0]["expr"]
        assert expr.startswith("sort_desc(topk(10, ") and "by (node" in expr, panel["title"]
        assert panel["targets"][0]["instant"] is True
        (link,) = panel["fieldConfig"]["defaults"]["links"]
        assert link["url"].startswith("/d/kubenode-node?") and "var-node=${__field.labels.node}" in link["url"]


def test_sidecar_configmaps_carry_the_dashboards():
    for name in ("kubenode-node", "kubenode-cluster"):
        cm = yaml.safe_load((ROOT / "grafana" / "configmaps" / f"{name}.yaml").read_text())
        assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"][f"{name}.json"]) == load(f"{name}.json")


def test_every_panel_has_queries():
    for name in ("kubenode-node.json", "kubenode-cluster.json"):
        model = load(name)
        panels = [p for p in model["panels"] if p["type"] != "row"]
        assert len(list(panel_queries(model))) >= len(panels)


def test_cluster_dashboard_has_a_row_for_the_exporters_own_cost():
    model = load("kubenode-cluster.json")
    titles = [p["title"] for p in model["panels"]]
    row = titles.index("Exporter cost")
    exprs = " ".join(t["expr"] for p in model["panels"][row + 1:] for t in p.get("targets", []))
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_max_fds", "kubenode_exporter_build_info"):
        assert name in exprs, name


def rows(model: dict) -> dict[str, list[dict]]:
    """{row title: the panels under it} of a dashboard whose rows are not collapsed."""
    out: dict[str, list[dict]] = {}
    current = None
    for panel in model["panels"]:
        if panel["type"] == "row":
            current = out.setdefault(panel["title"], [])
        elif current is not None:
            current.append(panel)
    return out


def exprs(panels: list[dict]) -> list[str]:
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_node_dashboard_drift_row_is_the_same_for_every_mode():
    """The drift row reads only mode-neutral series and shows the mode; IPVS table panels sit in
    their own row, read IPVS series only, and say why they are empty on other modes."""
    by_row = rows(load("kubenode-node.json"))
    drift = by_row["Dataplane drift"]
    assert drift and all("kubenode_dataplane_" in e or "kube_watch_up" in e for e in exprs(drift)), exprs(drift)
    assert not [e for e in exprs(drift) if "kubenode_ipvs_" in e]
    (mode,) = [p for p in drift if p["title"] == "Proxy mode"]
    assert "kubenode_dataplane_info" in mode["targets"][0]["expr"] and "{{mode}}" in mode["targets"][0]["legendFormat"]
    assert mode["options"]["textMode"] == "name"
    ipvs = by_row["IPVS table (IPVS mode only)"]
    assert ipvs
    for panel in ipvs:
        assert "No IPVS table" in panel["fieldConfig"]["defaults"]["noValue"], panel["title"]
        # Each query is empty where no IPVS table is read, so the panel shows the text above.
        assert all("kubenode_ipvs_" in e for e in exprs([panel])), panel["title"]
    latency = next(p for p in by_row["Proxy programming and sync"] if p["title"] == "Network programming latency")
    assert "kubenode_dataplane_programming_latency_seconds_bucket" in latency["targets"][0]["expr"]


def test_cluster_dashboard_counts_nodes_per_mode_and_drift_in_any_mode():
    model = load("kubenode-cluster.json")
    by_title = {p["title"]: p for p in model["panels"]}
    assert by_title["Nodes per proxy mode"]["targets"][0]["expr"].startswith("count by (mode) (kubenode_dataplane_info{")
    for title in ("Nodes with dataplane drift", "Dataplane drift items", "Dataplane drift, five worst nodes"):
        assert "node:kubenode_dataplane_drift:sum" in by_title[title]["targets"][0]["expr"], title
    assert "kubenode_ipvs_" not in json.dumps(model)
