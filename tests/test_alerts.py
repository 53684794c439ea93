"""The shipped rules: promtool checks them and runs the unit tests of every alert.

`promtool` comes from Debian's `prometheus` package (scripts/setup.sh --test installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tools.bundle import config as bundle_config
from tools.bundle.render import OPERATOR_FILE, RULES_FILE, rules_text
from tools.bundle.rules import ALERT_NAMES

ROOT = Path(__file__).resolve().parents[1]
UNIT_TESTS = ROOT / "alerts" / "tests" / "kubenode-exporter.test.yaml"


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool not found: install Debian's `prometheus` package (make setup-test)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def shipped_rules() -> list[dict]:
    return [r for g in yaml.safe_load((ROOT / RULES_FILE).read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_plain_rule_file():
    out = run_promtool("check", "rules", str(ROOT / RULES_FILE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(shipped_rules())} rules found" in out.stdout


def test_promtool_checks_the_operator_rule_groups(tmp_path):
    resource = yaml.safe_load((ROOT / OPERATOR_FILE).read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    plain = yaml.safe_load((ROOT / RULES_FILE).read_text())
    assert resource["spec"]["groups"] == plain["groups"], "PrometheusRule and rule file diverged"
    groups = tmp_path / "groups.yaml"
    groups.write_text(yaml.safe_dump({"groups": resource["spec"]["groups"]}))
    out = run_promtool("check", "rules", str(groups))
    assert out.returncode == 0, out.stdout + out.stderr


def test_exactly_the_twenty_two_alerts_with_labels_annotations_and_runbooks():
    alerts = {r["alert"]: r for r in shipped_rules() if "alert" in r}
    assert sorted(alerts) == sorted(ALERT_NAMES) and len(alerts) == 22
    cfg = bundle_config.load()
    node_template = "{{ $labels.%s }}" % cfg["nodeLabel"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        ann = rule["annotations"]
        assert ann["summary"] and node_template in ann["description"], name
        assert "$value" in ann["description"] or "$labels.collector" in ann["description"] \
            or "$labels.resource" in ann["description"] or "$labels.proxy" in ann["description"] \
            or "$labels.instance" in ann["description"], f"{name}: description names no figure"
        assert ann["runbook_url"] == cfg["runbookURLBase"] + name + ".md"
        runbook = ROOT / "docs" / "runbooks" / f"{name}.md"
        assert runbook.is_file(), f"missing runbook {runbook}"
        text = runbook.read_text()
        assert text.startswith(f"# {name}"), f"{runbook} must start with its alert name"
        assert rule["for"] in text, f"{runbook} does not justify for: {rule['for']}"


def test_critical_only_where_traffic_is_lost():
    critical = {r["alert"] for r in shipped_rules() if r.get("labels", {}).get("severity") == "critical"}
    assert critical == {"KubeNodeDataplaneStaleRealServers", "KubeNodeDataplaneMissingVirtualServers",
                        "KubeNodeDataplaneRejectedVirtualServers",
                        "KubeNodeIPVSGracefulTerminationStuck", "KubeNodeIpsetFull"}


DRIFT_ALERTS = {
    "KubeNodeDataplaneStaleRealServers": "stale_real_server",
    "KubeNodeDataplaneMissingVirtualServers": "missing_virtual_server",
    "KubeNodeDataplaneRejectedVirtualServers": "rejected_virtual_server",
    "KubeNodeDataplaneMissingRealServers": "missing_real_server",
    "KubeNodeDataplaneStaleVirtualServers": "stale_virtual_server",
    "KubeNodeDataplaneZeroWeightRealServers": "zero_weight_real_server",
}


def test_drift_alerts_are_mode_neutral_and_say_the_mode():
    """One drift alert per kind, on kubenode_dataplane_drift only, joined with kubenode_dataplane_info
    so the page names the mode; IPVS-only series are read only by KubeNodeIPVS* alerts."""
    alerts = {r["alert"]: r for r in shipped_rules() if "alert" in r}
    for name, kind in DRIFT_ALERTS.items():
        expr = alerts[name]["expr"]
        assert f'kubenode_dataplane_drift{{job="kubenode-exporter", kind="{kind}"}}' in expr, name
        assert "group_left (proxy, mode) kubenode_dataplane_info" in expr, name
        assert "kubenode_ipvs_" not in expr, name
        assert "$labels.mode" in alerts[name]["annotations"]["description"], name
    assert "kubenode_dataplane_info" in alerts["KubeNodeProxyProgrammingLatencyHigh"]["expr"]
    ipvs_only = {name for name, rule in alerts.items() if "kubenode_ipvs_" in rule["expr"]}
    assert ipvs_only == {"KubeNodeIPVSGracefulTerminationStuck", "KubeNodeIPVSTableUnreadable"}
    assert not [n for n in alerts if n.startswith("KubeNodeIPVS") and n not in ipvs_only]


# The drift names before issue 13 moved them to kubenode_dataplane_* (contract, "Every
# kube-proxy mode"); nothing shipped may read them any more.
RENAMED_METRICS = {
    "kubenode_ipvs_drift", "kubenode_ipvs_drift_oldest_seconds", "kubenode_ipvs_service_drift",
    "kubenode_ipvs_desired_virtual_servers", "kubenode_ipvs_desired_real_servers",
    "kubenode_ipvs_programming_latency_seconds", "kubenode_ipvs_drift_pending", "kubenode_ipvs_drift_synced",
    "kubenode_ipvs_service_drift_series_dropped", "kubenode_ipvs_programming_latency_pending",
    "kubenode_ipvs_programming_latency_dropped_total", "kubenode_ipvs_programming_latency_timeouts_total",
}


def test_bundle_reads_no_renamed_drift_metric():
    assert not referenced_metrics() & RENAMED_METRICS
    text = (ROOT / RULES_FILE).read_text()
    assert "node:kubenode_ipvs_drift:sum" not in text and "kubenode_ipvs_programming" not in text


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    spec = yaml.safe_load(UNIT_TESTS.read_text())
    fires, quiet = set(), set()
    for case in spec["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fires == set(ALERT_NAMES), f"no firing case: {set(ALERT_NAMES) - fires}"
    assert quiet == set(ALERT_NAMES), f"no quiet case: {set(ALERT_NAMES) - quiet}"


def test_promtool_unit_tests_pass():
    out = run_promtool("test", "rules", str(UNIT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_unit_tests_catch_a_changed_for_and_threshold(tmp_path):
    """The unit tests pin the shipped knobs: rules rendered with other ones fail them."""
    for overrides in ({"alerts": {"KubeNodeIpsetFull": {"for": "0m"}}},
                      {"alerts": {"KubeNodeDataplaneRejectedVirtualServers": {"for": "2m"}}},
                      {"alerts": {"KubeNodeMemcgStatReadSlow": {"threshold": 3}}}):
        cfg = bundle_config.load(overrides=overrides)
        (tmp_path / "alerts" / "tests").mkdir(parents=True, exist_ok=True)
        (tmp_path / RULES_FILE).write_text(rules_text(cfg))
        shutil.copy(UNIT_TESTS, tmp_path / "alerts" / "tests" / UNIT_TESTS.name)
        out = run_promtool("test", "rules", str(tmp_path / "alerts" / "tests" / UNIT_TESTS.name))
        assert out.returncode != 0, f"unit tests did not notice {overrides}"
        name = next(iter(overrides["alerts"]))
        assert name in out.stdout + out.stderr, out.stdout + out.stderr


def test_selector_and_node_label_come_from_the_one_config():
    cfg = bundle_config.load(overrides={"exporterSelector": 'job="kne", cluster="c1"', "nodeLabel": "hostname"})
    text = rules_text(cfg)
    assert 'job="kubenode-exporter"' not in text
    assert text.count('{job="kne", cluster="c1"') >= 10
    assert "$labels.node " not in text and "{{ $labels.hostname }}" in text


# The contract's metric names (../shared/contract.md) plus names taken from collectors'
# code where the contract has none; the bundle may reference nothing else.
CONTRACT_METRICS = {
    "kubenode_collector_success", "kubenode_collector_duration_seconds",
    "kubenode_ipvs_virtual_servers", "kubenode_ipvs_real_servers",
    # "Every kube-proxy mode": the drift names, mode-neutral.
    "kubenode_dataplane_info", "kubenode_dataplane_drift", "kubenode_dataplane_drift_oldest_seconds",
    "kubenode_dataplane_service_drift", "kubenode_dataplane_desired_virtual_servers",
    "kubenode_dataplane_desired_real_servers", "kubenode_dataplane_programming_latency_seconds",
    "kubenode_dataplane_read_seconds",
    "kubenode_ipset_sets", "kubenode_ipset_entries", "kubenode_ipset_max_entries", "kubenode_ipset_memory_bytes",
    "kubenode_proxy_up", "kubenode_proxy_sync_duration_seconds", "kubenode_proxy_last_sync_timestamp_seconds",
    "kubenode_process_up", "kubenode_process_cpu_seconds_total", "kubenode_process_children_cpu_seconds_total",
    "kubenode_process_resident_memory_bytes", "kubenode_memcg_stat_read_seconds", "kubenode_memcg_cgroups",
    "kubenode_kube_watch_up",
}
FROM_COLLECTOR_CODE = {
    "kubenode_proxy_sync_pending_seconds",  # exporter/collectors/proxy.py
    "kubenode_proxy_expected_metric_missing",  # exporter/collectors/proxy.py (named in an alert description)
    "kubenode_ipvs_stuck_graceful_termination_real_servers",  # exporter/collectors/drift.py
    "kubenode_exporter_build_info",  # exporter/own_metrics.py
    "kubenode_ipvs_unparsed_lines",  # exporter/collectors/ipvs.py
    "kubenode_dataplane_drift_pending",  # the drift collector (kubenode_ipvs_drift_pending renamed)
}
# Names the bundle reads that the drift collector produces only once t-drift (issue 13's
# mode-neutral drift collector) lands: remove each from here at merge; the test below then
# holds them to the exporter's code like every other name. (t-drift)
def referenced_metrics() -> set[str]:
    import re
    texts = [(ROOT / RULES_FILE).read_text()]
    texts += [p.read_text() for p in (ROOT / "grafana" / "dashboards").glob("*.json")]
    names = set()
    for text in texts:
        for name in re.findall(r"(?<![:\w])kubenode_[a-z_]+", text):
            names.add(re.sub(r"_(bucket|count|sum)$", "", name))
    names.discard("kubenode_exporter")  # job name, runbook URLs
    return names


def test_bundle_references_only_known_metric_names():
    unknown = referenced_metrics() - CONTRACT_METRICS - FROM_COLLECTOR_CODE
    assert not unknown, f"names in neither the contract nor a collector: {sorted(unknown)}"


def test_names_match_the_collectors_present_in_this_tree():
    """Where exporter/collectors/<family>.py exists, the names the bundle uses must be in its code."""
    collectors = ROOT / "exporter" / "collectors"
    source = "\n".join(p.read_text() for p in (ROOT / "exporter").rglob("*.py"))
    checked = 0
    for name in sorted(referenced_metrics()):
        family, _, tail = name.removeprefix("kubenode_").partition("_")
        # ipvs_* names are split between the table reader and the drift model (other modules,
        # landing separately), so only single-module families are checked here.
        if family not in ("ipset", "proxy", "process", "memcg") or not (collectors / f"{family}.py").exists():
            continue
        tail = tail.removesuffix("_total")
        assert tail in source, f"{name}: exporter/collectors/{family}.py is here but nothing produces it"
        checked += 1
    assert (collectors / "ipset.py").exists() and checked >= 2


def test_drift_names_are_produced_by_the_exporters_code():
    """Every kubenode_dataplane_* and kubenode_ipvs_* name the bundle reads is spelled in exporter/
    (collectors build names as NAMESPACE + "_" + the rest; the ipvs collector as "ipvs_" + a quoted
    tail), unless awaited from t-drift."""
    import re
    source = "\n".join(p.read_text() for p in (ROOT / "exporter").rglob("*.py"))
    ipvs_collector = (ROOT / "exporter" / "collectors" / "ipvs.py").read_text()
    missing = []
    for name in sorted(referenced_metrics()):
        if not name.startswith(("kubenode_dataplane_", "kubenode_ipvs_")):
            continue
        rest = name.removeprefix("kubenode_").removesuffix("_total")
        spelled = re.search(rf"(?<![A-Za-z0-9]){re.escape(rest)}(?![a-z_])", source)
        if not spelled and rest.startswith("ipvs_"):
            spelled = f'"{rest.removeprefix("ipvs_")}"' in ipvs_collector
        if not spelled:
            missing.append(name)
    assert not missing, f"read by the bundle, produced by nothing in exporter/: {missing}"
