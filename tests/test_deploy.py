"""deploy/: every overlay renders with kustomize, validates offline against the Kubernetes
schemas of the last three minor versions and the prometheus-operator CRD schemas, and
asks for no privilege beyond the documented ones."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = {"base": DEPLOY / "base",
            "prometheus": DEPLOY / "overlays" / "prometheus",
            "prometheus-operator": DEPLOY / "overlays" / "prometheus-operator",
            "prometheus-operator-tls": DEPLOY / "overlays" / "prometheus-operator-tls",
            # Not shipped as an overlay: the no-net-admin component on the plain overlay,
            # rendered from a kustomization the test writes (render_with_components).
            "prometheus+no-net-admin": None}
SCHEMAS = DEPLOY / "schemas"
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors.monitoring.coreos.com-v1.yaml",
               ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules.monitoring.coreos.com-v1.yaml"}

# What the exporter reads from the API (exporter/kube/client.py): nothing else.
ALLOWED_RULES = {("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")}
READ_VERBS = {"get", "list", "watch"}
# The one capability, and the host paths, that docs/security.md justifies.
ADDED_CAPABILITIES = ["NET_ADMIN"]
HOST_PATHS = {"/proc": "/host/proc", "/sys/fs/cgroup": "/host/sys/fs/cgroup"}


def k8s_versions() -> list[str]:
    """The last three minor versions kubernetes-validate ships schemas for."""
    minors = sorted({kv.major_minor(v) for v in kv.all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
    return minors[-3:]


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.fail("kubectl (with its built-in kustomize, v5) is needed to render deploy/; not installed")
    if OVERLAYS[name] is not None:
        return _kustomize(kubectl, OVERLAYS[name], name)
    overlay, component = name.split("+")
    with tempfile.TemporaryDirectory(prefix=f"deploy-kustomize-{os.getpid()}-") as tmp:
        rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731 - kustomize refuses absolute roots
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel(OVERLAYS[overlay])], "components": [rel(DEPLOY / "components" / component)]}))
        return _kustomize(kubectl, Path(tmp), name)


def _kustomize(kubectl: str, directory: Path, name: str) -> tuple[dict, ...]:
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize {name}: {out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(name: str, kind: str) -> list[dict]:
    return [o for o in render(name) if o["kind"] == kind]


def the(name: str, kind: str) -> dict:
    found = objects(name, kind)
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


# --- schemas -----------------------------------------------------------------------------------

def structural_to_json_schema(node):
    """A CRD's structural openAPIV3Schema -> JSON Schema, as the API server applies it under
    strict field validation: int-or-string, and unknown fields are errors."""
    if isinstance(node, list):
        return [structural_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "default", "format"):
            continue
        out[key] = structural_to_json_schema(value)
    if isinstance(out.get("pattern"), str):
        # Go's RE2 takes inline flags anywhere, Python's re only at the start.
        out["pattern"] = re.sub(r"^\^\(\?([a-z]+)\)", r"(?\1)^", out["pattern"])
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
        if "pattern" in out:  # a pattern applies to the string form only
            out = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": out.pop("pattern")}]}
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Validator:
    doc = yaml.safe_load((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema = structural_to_json_schema(doc["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_object(obj: dict, version: str) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        errors = sorted(crd_validator(*key).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {errors[0].message} "
                                 f"at {'.'.join(map(str, errors[0].path))}")
        _check_object_meta(obj)
        return
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as err:
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: {err.message} "
                             f"at {'.'.join(map(str, err.path))}") from None


def _check_object_meta(obj: dict) -> None:
    # The CRD schema leaves metadata to the API server: check what it would.
    meta = obj["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 253
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta.get("namespace", "x"))
    for label, value in meta.get("labels", {}).items():
        assert isinstance(value, str) and len(value) <= 63, (label, value)


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_manifests_validate_offline(overlay, version):
    docs = render(overlay)
    assert docs
    for obj in docs:
        validate_object(obj, version)


def test_three_kubernetes_versions_are_checked():
    versions = k8s_versions()
    assert len(versions) == 3, versions
    for version in versions:  # each has the strict schema of every built-in kind we ship
        kv.validate(the("base", "DaemonSet"), version, strict=True)


def test_validation_catches_a_misspelt_field():
    # The same checks must be able to fail: a typo in the security context, a bad enum.
    ds = copy.deepcopy(the("base", "DaemonSet"))
    sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["readOnlyRootFilesytem"] = sc.pop("readOnlyRootFilesystem")
    with pytest.raises(AssertionError, match="readOnlyRootFilesytem"):
        validate_object(ds, k8s_versions()[-1])
    sm = copy.deepcopy(the("prometheus-operator", "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["scheme"] = "ftp"
    with pytest.raises(AssertionError, match="ftp"):
        validate_object(sm, k8s_versions()[-1])
    sm = copy.deepcopy(the("prometheus-operator", "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["relabellings"] = []
    with pytest.raises(AssertionError, match="relabellings"):
        validate_object(sm, k8s_versions()[-1])
    rule = copy.deepcopy(the("prometheus-operator", "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0].pop("expr")
    with pytest.raises(AssertionError, match="expr"):
        validate_object(rule, k8s_versions()[-1])


# --- privileges --------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rbac_is_read_only_on_exactly_what_is_read(overlay):
    assert not objects(overlay, "Role") and not objects(overlay, "RoleBinding")
    role = the(overlay, "ClusterRole")
    granted = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        assert set(rule["verbs"]) <= READ_VERBS, rule["verbs"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource)
                granted.add((group, resource))
    assert granted == ALLOWED_RULES
    assert not {r for _, r in granted} & {"secrets", "configmaps", "pods", "serviceaccounts"}
    binding = the(overlay, "ClusterRoleBinding")
    sa = the(overlay, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def pod_spec(overlay: str) -> dict:
    return the(overlay, "DaemonSet")["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_host_access_is_read_only_and_minimal(overlay):
    spec = pod_spec(overlay)
    assert spec["hostNetwork"] is True and spec["hostPID"] is True and spec.get("hostIPC", False) is False
    host_volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host_volumes.values()) == set(HOST_PATHS)
    containers = spec["containers"] + spec.get("initContainers", [])
    for container in containers:
        for mount in container.get("volumeMounts", []):
            if mount["name"] in host_volumes:
                assert mount.get("readOnly") is True, mount
                assert mount["mountPath"] == HOST_PATHS[host_volumes[mount["name"]]]
                assert mount.get("mountPropagation", "None") in ("None", "HostToContainer")
    # No other writable volume either: the root file system is read-only and nothing is mounted rw.
    for container in containers:
        assert all(m.get("readOnly") for m in container.get("volumeMounts", [])), container["name"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_container_security_context(overlay):
    spec = pod_spec(overlay)
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is True
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert "seLinuxOptions" not in sc and "procMount" not in sc
    if overlay.endswith("+no-net-admin"):
        # No capability, so no reason for root; the ipset collector, which needs it, is off.
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsUser"] == 65534 and sc["runAsGroup"] == 65534 and sc["runAsNonRoot"] is True
        assert "--no-collector.ipset" in container["args"]
        assert spec["securityContext"]["fsGroup"] == 65534  # group-readable Secrets (web-tls)
    else:
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ADDED_CAPABILITIES}
        # Root only because of the capability (docs/security.md); never root with more.
        assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False


def test_documented_capabilities_match_the_manifest():
    doc = (REPO / "docs" / "security.md").read_text()
    sc = pod_spec("base")["containers"][0]["securityContext"]
    documented = set(re.findall(r"`CAP_([A-Z_]+)`", doc))
    assert documented == set(sc["capabilities"]["add"]), documented
    for path in HOST_PATHS:
        assert f"`{path}`" in doc, path


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_daemonset_runs_everywhere_with_probes_resources_and_node_name(overlay):
    spec = pod_spec(overlay)
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    (container,) = spec["containers"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert container[probe]["httpGet"]["port"] == "metrics"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"} and set(resources["limits"]) == {"cpu", "memory"}
    args = container["args"]
    assert "--path.procfs=/host/proc" in args and "--path.sysfs=/host/sys" in args
    (port,) = container["ports"]
    assert port["name"] == "metrics" and port["hostPort"] == port["containerPort"]
    assert f"--web.listen-address=[$(HOST_IP)]:{port['containerPort']}" in args


def test_no_net_admin_component_disables_a_collector_that_exists():
    from exporter.collector import load_collectors

    if "ipset" not in load_collectors():
        pytest.skip("the ipset collector (issue 2) is not in this tree yet: --no-collector.ipset unchecked")
    from exporter.cli import settings_from_args

    args = [a.replace("$(HOST_IP)", "10.0.0.1") for a in pod_spec("prometheus+no-net-admin")["containers"][0]["args"]]
    assert settings_from_args(args).collector_enabled("ipset") is False


def test_web_tls_overlay_mounts_the_web_config_read_only():
    spec = pod_spec("prometheus-operator-tls")
    (container,) = spec["containers"]
    flag = next(a for a in container["args"] if a.startswith("--web.config.file="))
    path = Path(flag.split("=", 1)[1])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "web-config")
    assert mount["readOnly"] is True and path.parent == Path(mount["mountPath"])
    volume = next(v for v in spec["volumes"] if v["name"] == "web-config")
    assert set(volume) == {"name", "secret"} and volume["secret"]["defaultMode"] == 0o440
    assert all(container[p]["httpGet"]["scheme"] == "HTTPS" for p in ("livenessProbe", "readinessProbe"))
    endpoint = the("prometheus-operator-tls", "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"]
    assert "insecureSkipVerify" not in endpoint["tlsConfig"]
    # The Secret is the user's: nothing in deploy/ ships one, and RBAC still grants none.
    assert not objects("prometheus-operator-tls", "Secret")


def test_args_are_flags_the_exporter_accepts():
    from exporter.cli import settings_from_args

    container = pod_spec("base")["containers"][0]
    args = [a.replace("$(HOST_IP)", "10.0.0.1") for a in container["args"]]
    settings = settings_from_args(args)
    assert settings["path.procfs"] == "/host/proc" and settings["path.sysfs"] == "/host/sys"
    from exporter.http import parse_listen_address

    assert parse_listen_address(settings["web.listen-address"]) == ("10.0.0.1", 9815)
    assert parse_listen_address(container["args"][0].split("=", 1)[1].replace("$(HOST_IP)", "fd00::1")) == \
        ("fd00::1", 9815)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_namespace_and_pod_security_level(overlay):
    ns = the(overlay, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for obj in render(overlay):
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "PrometheusRule", "ConfigMap"):
            assert obj["metadata"]["namespace"] == ns["metadata"]["name"], obj["kind"]


# --- scraping ----------------------------------------------------------------------------------

def test_headless_service_selects_the_pods():
    svc = the("base", "Service")
    ds = the("base", "DaemonSet")
    assert svc["spec"]["clusterIP"] == "None"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def test_service_monitor_matches_service_and_the_alerts_job():
    svc = the("prometheus-operator", "Service")
    sm = the("prometheus-operator", "ServiceMonitor")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert {p["name"] for p in svc["spec"]["ports"]} >= {e["port"] for e in sm["spec"]["endpoints"]}
    # The job label is the Service's name; the shipped alerts select job="kubenode-exporter"
    # and read the node's name from `node`.
    assert "jobLabel" not in sm["spec"] and svc["metadata"]["name"] == "kubenode-exporter"
    relabel = sm["spec"]["endpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node", "action": "replace"} in relabel
    rules = objects("prometheus-operator", "PrometheusRule")
    assert rules, "the bundle's PrometheusRule is missing from the operator overlay"
    exprs = [r["expr"] for obj in rules for g in obj["spec"]["groups"] for r in g["rules"]]
    assert any('job="kubenode-exporter"' in e for e in exprs)


def test_dashboards_configmaps_are_in_the_operator_overlay():
    maps = objects("prometheus-operator", "ConfigMap")
    assert maps and all(m["metadata"]["labels"].get("grafana_dashboard") == "1" for m in maps)
    for m in maps:
        for name, body in m["data"].items():
            assert name.endswith(".json") and body.lstrip().startswith("{")


def test_bundle_copies_are_up_to_date():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_bundle", DEPLOY / "sync_bundle.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    if not any((REPO / f).is_dir() for f in sync.SOURCES):
        # Visible in the summary (-ra); on main, with the bundle merged, the comparison runs.
        pytest.skip("alerts/operator and grafana/configmaps not in this tree yet (issue 5): "
                    "the copies are only schema-checked")
    assert sync.differences(REPO) == [], "run: python deploy/sync_bundle.py"


def test_plain_prometheus_overlay_and_scrape_config(tmp_path):
    ds = the("prometheus", "DaemonSet")
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    port = ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool (Debian package prometheus) is needed to check the scrape config")
    scrape = yaml.safe_load((OVERLAYS["prometheus"] / "scrape-config.yaml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "kubenode-exporter"
    assert {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"} in job["relabel_configs"]
    # Debian's Prometheus is built without Kubernetes discovery, so promtool checks the
    # job with the discovery swapped for a static target (relabelling, intervals and the
    # rest as shipped) and the discovery block is checked here against its documented keys.
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd["role"] == "pod" and sd["namespaces"] == {"names": ["kubenode-exporter"]}
    assert set(sd) <= {"role", "namespaces", "selectors", "api_server", "attach_metadata"}
    assert all(set(sel) == {"role", "label"} and sel["role"] == "pod" for sel in sd["selectors"])
    job["static_configs"] = [{"targets": ["127.0.0.1:9815"]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "30s"}, **scrape}))
    out = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_runbooks_name_the_namespace_container_and_labels_deploy_installs():
    runbooks = REPO / "docs" / "runbooks"
    if not runbooks.is_dir():
        pytest.skip("docs/runbooks (issue 5) not in this tree")
    ds = the("base", "DaemonSet")
    namespace, (container,) = ds["metadata"]["namespace"], ds["spec"]["template"]["spec"]["containers"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    commands = [line for page in sorted(runbooks.glob("*.md")) for line in page.read_text().splitlines()
                if "kubectl" in line and "kubenode-exporter" in line]
    assert commands
    for line in commands:
        if " -c " in line:
            assert re.search(rf"-n {re.escape(namespace)}\b", line) and f"-c {container['name']}" in line, line
        for key, value in re.findall(r"-l ([\w./-]+)=([\w.-]+)", line):
            assert labels.get(key) == value, line
