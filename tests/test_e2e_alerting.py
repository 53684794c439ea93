"""End to end, for real: an ipset fills up, the exporter sees it, Prometheus evaluates the
shipped rules, Alertmanager receives the page, and it resolves once the set is emptied.

Everything runs in this test's own network namespace (`kn-bundle-<pid>-<n>`): the exporter
(ipsets are per namespace, so it sees only this test's set), Prometheus (Debian 2.42) and
Alertmanager (Debian 0.25) on 127.0.0.1 ports of that namespace, and a webhook receiver
standing in for the pager. The test talks to them from a thread that joined the namespace.
The rules are the shipped ones rendered through the one bundle config, with only `for` of
the two ipset alerts shortened (tools/bundle/config.yaml overrides); scrape and evaluation
run every second. Then every query of every dashboard panel runs against that Prometheus.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import yaml

from tools.bundle import config as bundle_config
from tools.bundle.dashboards import dashboards, panel_queries
from tools.bundle.render import rules_text

pytestmark = [pytest.mark.e2e, pytest.mark.root]

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()
JOB = "kubenode-exporter"
SET = "kn-e2e-fill"
MAXELEM = 10
# Only `for` changes, and only through the bundle's one config.
SHORT_FOR = {"alerts": {"KubeNodeIpsetNearlyFull": {"for": "2s"}, "KubeNodeIpsetFull": {"for": "2s"}}}


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"end-to-end test needs {', '.join(missing)} (Debian packages prometheus, "
                    "prometheus-alertmanager, ipset, iproute2, util-linux: make setup-test)")


class Namespace:
    """A network namespace of this test; code runs in it from a thread that joined it."""

    def __init__(self) -> None:
        self.name = f"kn-bundle-{os.getpid()}-{next(_counter)}"
        self.path = f"/run/netns/{self.name}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=30)
        try:
            subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
                           check=True, capture_output=True, timeout=30)
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)

    def run(self, fn: Callable[[], T]) -> T:
        result: list = []

        def target() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                result.append((True, fn()))
            except BaseException as err:  # noqa: BLE001 - handed back to the caller
                result.append((False, err))

        thread = threading.Thread(target=target, name=f"in-{self.name}")
        thread.start()
        thread.join(timeout=60)
        if not result:
            raise TimeoutError(f"call in {self.name} did not return in 60 s")
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def free_port(self) -> int:
        def pick() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]
        return self.run(pick)

    def get_json(self, url: str) -> dict:
        def fetch() -> dict:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as err:  # Prometheus explains a bad query in the body
                return json.loads(err.read() or b"{}") | {"http_status": err.code}
        return self.run(fetch)

    def ipset(self, *args: str, input: str | None = None) -> None:
        subprocess.run(["nsenter", f"--net={self.path}", "ipset", *args], input=input, text=True,
                       check=True, capture_output=True, timeout=30)

    def popen(self, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", f"--net={self.path}", *cmd], stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, **kw)


def wait_for(what: str, check: Callable[[], T], timeout: float, procs: dict[str, subprocess.Popen],
             logs: Path) -> T:
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{(logs / (name + '.log')).read_text()[-3000:]}")
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, KeyError) as err:
            last_err = err
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_err})")


class Pager(BaseHTTPRequestHandler):
    """Alertmanager's webhook receiver: records every notification."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's spelling
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stack(tmp_path):
    need("prometheus", "prometheus-alertmanager", "ipset", "ip", "nsenter")
    ns = Namespace()
    procs: dict[str, subprocess.Popen] = {}
    pager: HTTPServer | None = None
    try:
        node = f"e2e-node-{os.getpid()}"
        ports = {name: ns.free_port() for name in ("exporter", "prometheus", "alertmanager", "pager")}
        # The fault's set exists before the exporter starts, empty.
        ns.ipset("create", SET, "hash:ip", "maxelem", str(MAXELEM))

        Pager.received = []
        pager = ns.run(lambda: HTTPServer(("127.0.0.1", ports["pager"]), Pager))
        threading.Thread(target=pager.serve_forever, daemon=True).start()

        (tmp_path / "am.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "pager", "group_by": ["alertname", "set"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "pager", "webhook_configs": [
                {"url": f"http://127.0.0.1:{ports['pager']}/", "send_resolved": True}]}],
        }))
        rules = tmp_path / "rules.yaml"
        rules.write_text(rules_text(bundle_config.load(overrides=SHORT_FOR)))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{ports['alertmanager']}"]}]}]},
            "scrape_configs": [{"job_name": JOB, "static_configs": [
                {"targets": [f"127.0.0.1:{ports['exporter']}"], "labels": {"node": node}}]}],
        }))
        # A gentle exec loop stands in for kube-router, so the process panels see a real
        # component with real exited children (matched by a marker in its command line).
        marker = f"kn-bundle-storm-{os.getpid()}"
        storm = subprocess.Popen(["sh", "-c", f"while :; do /bin/true; sleep 0.1; done # {marker}"])
        procs["storm"] = storm
        (tmp_path / "exporter.yml").write_text(yaml.safe_dump({"process.components": [
            {"name": "kube-router", "match": marker}, {"name": "kubelet", "match": "^kubelet$"}]}))
        env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig"), "PYTHONPATH": str(ROOT)}
        procs["exporter"] = ns.popen([sys.executable, "-m", "exporter", "--web.listen-address",
                                      f"127.0.0.1:{ports['exporter']}", "--node-name", node,
                                      "--config.file", str(tmp_path / "exporter.yml")],
                                     tmp_path / "exporter.log", env=env, cwd=ROOT)
        procs["alertmanager"] = ns.popen([
            "prometheus-alertmanager", f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
            "--cluster.listen-address="], tmp_path / "alertmanager.log")
        procs["prometheus"] = ns.popen([
            "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}", f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            "--rules.alert.resend-delay=1s"], tmp_path / "prometheus.log")
        yield {"ns": ns, "procs": procs, "logs": tmp_path, "node": node,
               "prom": f"http://127.0.0.1:{ports['prometheus']}",
               "am": f"http://127.0.0.1:{ports['alertmanager']}"}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if pager is not None:
            pager.shutdown()
            pager.server_close()
        ns.delete()


def query(s: dict, expr: str) -> dict:
    return s["ns"].get_json(s["prom"] + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def am_alerts(s: dict) -> list[dict]:
    url = s["am"] + "/api/v2/alerts?" + urllib.parse.urlencode({"filter": f'set="{SET}"'})
    return s["ns"].get_json(url)


def firing(s: dict, name: str) -> list[dict]:
    return [a for a in am_alerts(s) if a["labels"]["alertname"] == name and a["status"]["state"] == "active"]


def fill(s: dict, count: int, start: int = 0) -> None:
    s["ns"].ipset("restore", input="".join(f"add {SET} 10.77.0.{i + 1}\n" for i in range(start, count)))


def test_ipset_fault_pages_through_alertmanager_and_resolves(stack):
    s, wait = stack, (lambda what, check, timeout=90: wait_for(what, check, timeout, stack["procs"], stack["logs"]))
    wait("Prometheus to scrape the exporter's ipset series",
         lambda: query(s, f'kubenode_ipset_max_entries{{set="{SET}"}}')["data"]["result"])

    t0 = time.monotonic()
    fill(s, MAXELEM - 1)  # 90 %: past the 80 % threshold, not full
    nearly = wait("KubeNodeIpsetNearlyFull in Alertmanager", lambda: firing(s, "KubeNodeIpsetNearlyFull"))
    assert len(nearly) == 1
    timings = {"fault to NearlyFull in Alertmanager": time.monotonic() - t0}
    alert = nearly[0]
    assert alert["labels"] == {
        "alertname": "KubeNodeIpsetNearlyFull", "severity": "warning", "set": SET, "job": JOB,
        "instance": alert["labels"]["instance"], "node": s["node"]}
    assert alert["labels"]["instance"].startswith("127.0.0.1:")
    assert alert["annotations"] == {
        "summary": "An ipset is nearly full.",
        "description": f"ipset {SET} on node {s['node']} is 90% full (threshold 80%): once full, every add fails.",
        "runbook_url": "https://github.com/kubenode-exporter/kubenode-exporter/blob/main/docs/runbooks/"
                       "KubeNodeIpsetNearlyFull.md"}
    # At 90 % the critical alert is not even pending.
    assert not query(s, 'ALERTS{alertname="KubeNodeIpsetFull"}')["data"]["result"]

    fill(s, MAXELEM, start=MAXELEM - 1)  # the last slot: full
    full = wait("KubeNodeIpsetFull in Alertmanager", lambda: firing(s, "KubeNodeIpsetFull"))
    assert full[0]["labels"]["severity"] == "critical" and full[0]["labels"]["node"] == s["node"]
    assert full[0]["annotations"]["description"].startswith(f"ipset {SET} on node {s['node']} is 100% full")
    wait("the pager to be notified of both alerts",
         lambda: {a["labels"]["alertname"] for n in Pager.received if n["status"] == "firing" for a in n["alerts"]}
         >= {"KubeNodeIpsetNearlyFull", "KubeNodeIpsetFull"})

    # The cluster dashboard's alert counter, as shipped, counts them.
    firing_expr = next(expr for title, expr, _ in panel_queries(dashboards(bundle_config.load())["kubenode-cluster.json"])
                       if title == "Firing kubenode alerts")
    assert float(query(s, firing_expr)["data"]["result"][0]["value"][1]) >= 2
    # And the node dashboard's alert annotations mark them on this node.
    marks = next(expr for title, expr, _ in panel_queries(dashboards(bundle_config.load())["kubenode-node.json"])
                 if title.startswith("annotation:"))
    marked = query(s, substitute(marks, s["node"]))["data"]["result"]
    assert {m["metric"]["alertname"] for m in marked} == {"KubeNodeIpsetNearlyFull", "KubeNodeIpsetFull"}

    t0 = time.monotonic()
    s["ns"].ipset("flush", SET)  # clear the fault
    wait("both alerts to resolve in Alertmanager", lambda: not [a for a in am_alerts(s)
                                                               if a["status"]["state"] == "active"])
    resolved = wait("resolved notifications at the pager", lambda: {
        a["labels"]["alertname"] for n in Pager.received for a in n["alerts"] if a["status"] == "resolved"}
        >= {"KubeNodeIpsetNearlyFull", "KubeNodeIpsetFull"})
    assert resolved
    timings["fix to resolved at the pager"] = time.monotonic() - t0
    print("e2e timings (s):", {k: round(v, 1) for k, v in timings.items()})
    assert not query(s, 'ALERTS{alertname=~"KubeNodeIpset.*"}')["data"]["result"]

    check_dashboard_queries(s)


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")


def substitute(expr: str, node: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$job", JOB).replace("$node", node))


def check_dashboard_queries(s: dict) -> None:
    """Every panel query runs without error; those whose series the scenario produces return data."""
    cfg = bundle_config.load()
    errors, empty, checked, with_data = [], [], 0, set()
    for name, model in dashboards(cfg).items():
        for title, raw, _ in panel_queries(model):
            expr = substitute(raw, s["node"])
            answer = query(s, expr)
            checked += 1
            if answer.get("status") != "success":
                errors.append(f"{name} / {title}: {expr}: {answer}")
                continue
            # Data is expected when each selector in the query has data on its own and the
            # query does not filter for a failure (`== 0`) that this scenario lacks.
            selectors = [m.group(0) for m in SELECTOR.finditer(expr)]
            produced = all(query(s, sel)["data"]["result"] for sel in selectors)
            if produced and "== 0)" not in expr.replace("or vector(0)", ""):
                if answer["data"]["result"]:
                    with_data.add(title)
                else:
                    empty.append(f"{name} / {title}: {expr}")
    assert not errors, "queries that Prometheus refused:\n" + "\n".join(errors)
    assert not empty, "queries without data although their series exist:\n" + "\n".join(empty)
    print("panels with data:", sorted(with_data))
    # The scenario produces at least the ipset, collector and up series.
    assert checked == sum(1 for m in dashboards(cfg).values() for _ in panel_queries(m))
    expected = {"ipset fill (entries / maxelem)", "ipset entries, largest sets", "Collectors", "Collector duration",
                "Nodes scraped", "Fullest ipset",
                # the exporter's own cost (always on): node row and cluster row
                "Exporter CPU", "Exporter memory", "Exporter CPU, worst nodes", "Exporter memory, worst nodes",
                "Exporter open fds, worst nodes", "Exporter CPU over time, five heaviest nodes", "Exporter versions"}
    collectors = ROOT / "exporter" / "collectors"
    if (collectors / "process.py").exists():  # the stand-in kube-router of the fixture
        expected |= {"Process CPU", "Exited children CPU (exec storms)", "Resident memory",
                     "Components running", "Proxy CPU (own + children)"}
    if (collectors / "memcg.py").exists():  # the host's own memory hierarchy
        expected |= {"memory.stat read time", "Memory cgroups: live and dying", "Slowest memory.stat read",
                     "Dying memory cgroups"}
    assert expected <= with_data, f"no data: {sorted(expected - with_data)}"
