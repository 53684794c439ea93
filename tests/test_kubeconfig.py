"""API configuration and credentials against the API stand-in over real TLS.

Each kind of kubeconfig the exporter accepts (CA data and a token, a token file,
client certificates, an exec credential plugin, in-cluster with a rotating token)
lists Services from ``tests/apiserver.py``; what it refuses is one line.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import textwrap

import pytest
import yaml

from exporter.kube.client import ApiClient, ApiError, load_config
from exporter.kube.kubeconfig import Credentials, KubeConfigError
from tests.apiserver import FakeApiServer, make_client_certificate, service


@pytest.fixture
def tls_server(tmp_path):
    folder = tmp_path / f"apiserver-{os.getpid()}"
    folder.mkdir()
    server = FakeApiServer(tls_dir=str(folder)).start()
    server.create("services", service("default", "web", "10.96.0.7"))
    try:
        yield server
    finally:
        server.stop()


def kubeconfig(path, server: str, cluster: dict | None = None, user: dict | None = None) -> str:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
           "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
           "users": [{"name": "u", "user": user or {}}],
           "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}]}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def names(api: ApiClient) -> list[str]:
    page = api.list_page("/api/v1/services", {"limit": 10})
    return [item["metadata"]["name"] for item in page["items"]]


def test_ca_data_and_a_token(tls_server, tmp_path):
    path = kubeconfig(tmp_path / "kc", tls_server.url, {"certificate-authority-data": b64(tls_server.ca_pem)},
                      {"token": tls_server.token})
    api = ApiClient.from_settings(path)
    try:
        assert names(api) == ["web"]
        assert names(api) == ["web"]  # a second page over the kept-alive connection
    finally:
        api.close()
    wrong = ApiClient.from_settings(kubeconfig(tmp_path / "kc2", tls_server.url,
                                               {"certificate-authority-data": b64(tls_server.ca_pem)},
                                               {"token": "not-the-token"}))
    with pytest.raises(ApiError, match="HTTP 401") as err:
        names(wrong)
    assert err.value.status == 401
    wrong.close()


def test_relative_paths_resolve_against_the_kubeconfig_folder(tls_server, tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "ca.pem").write_bytes(tls_server.ca_pem)
    (folder / "token").write_text(tls_server.token + "\n")
    path = kubeconfig(folder / "kubeconfig", tls_server.url, {"certificate-authority": "ca.pem"},
                      {"tokenFile": "token"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.ca_file == str(folder / "ca.pem") and config.token_file == str(folder / "token")
    api = ApiClient.from_config(config)
    try:
        assert names(api) == ["web"]
    finally:
        api.close()


def test_a_token_file_is_read_again_after_a_401(tls_server, tmp_path):
    token = tmp_path / "token"
    token.write_text(tls_server.token)
    path = kubeconfig(tmp_path / "kc", tls_server.url, {"certificate-authority-data": b64(tls_server.ca_pem)},
                      {"tokenFile": str(token), "token": "a-stale-inline-token"})
    api = ApiClient.from_settings(path)
    try:
        assert names(api) == ["web"]  # the file wins over the inline token, as in client-go
        tls_server.token = "rotated"
        token.write_text("rotated")
        assert names(api) == ["web"]
        assert api.http.credentials.fetches == 2
    finally:
        api.close()


def test_client_certificate_auth(tmp_path):
    folder = tmp_path / "tls"
    folder.mkdir()
    client_ca, crt, key = make_client_certificate(str(folder))
    server = FakeApiServer(tls_dir=str(folder), client_ca=client_ca).start()
    server.create("services", service("default", "web", "10.96.0.7"))
    try:
        ca = {"certificate-authority-data": b64(server.ca_pem)}
        with open(crt, "rb") as fh:
            crt_pem = fh.read()
        with open(key, "rb") as fh:
            key_pem = fh.read()
        for user in ({"client-certificate": crt, "client-key": key},
                     {"client-certificate-data": b64(crt_pem), "client-key-data": b64(key_pem)}):
            api = ApiClient.from_settings(kubeconfig(tmp_path / "kc", server.url, ca, user))
            try:
                assert names(api) == ["web"]  # no token: the certificate is the credential
            finally:
                api.close()
        without = ApiClient.from_settings(kubeconfig(tmp_path / "kc", server.url, ca, {}))
        with pytest.raises(ApiError, match="LIST /api/v1/services: SSL|LIST /api/v1/services: Connection"):
            names(without)
        without.close()
    finally:
        server.stop()


PLUGIN = textwrap.dedent("""\
    #!{python}
    import json, os, sys, time
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "runs"), "a") as fh:
        fh.write(json.dumps({{"args": sys.argv[1:], "env": os.environ.get("PLUGIN_ENV"),
                              "info": json.loads(os.environ["KUBERNETES_EXEC_INFO"])}}) + "\\n")
    with open(os.path.join(here, "token")) as fh:
        token = fh.read().strip()
    with open(os.path.join(here, "lifetime")) as fh:
        lifetime = float(fh.read())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + lifetime))
    print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                      "status": {{"token": token, "expirationTimestamp": stamp}}}}))
    """)


def test_exec_plugin_runs_again_after_expiry_and_after_a_401(tls_server, tmp_path):
    folder = tmp_path / "plugin"
    folder.mkdir()
    script = folder / "credential.py"
    script.write_text(PLUGIN.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (folder / "token").write_text(tls_server.token)
    (folder / "lifetime").write_text("3600")
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "./plugin/credential.py",
                     "args": ["--cluster", "test"], "env": [{"name": "PLUGIN_ENV", "value": "set"}],
                     "provideClusterInfo": True, "interactiveMode": "Never"}}
    path = kubeconfig(tmp_path / "kc", tls_server.url, {"certificate-authority-data": b64(tls_server.ca_pem)}, user)

    def runs() -> list[dict]:
        text = (folder / "runs").read_text() if (folder / "runs").exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    api = ApiClient.from_settings(path)
    try:
        assert names(api) == ["web"] and names(api) == ["web"]
        assert len(runs()) == 1  # an unexpired credential is reused
        first = runs()[0]
        assert first["args"] == ["--cluster", "test"] and first["env"] == "set"
        assert first["info"]["kind"] == "ExecCredential" and first["info"]["spec"]["interactive"] is False
        assert first["info"]["spec"]["cluster"]["server"] == tls_server.url
        # The API stops accepting the token: a 401 runs the plugin again, the request goes through.
        tls_server.token = "second"
        (folder / "token").write_text("second")
        assert names(api) == ["web"]
        assert len(runs()) == 2
        # A credential that expires (within the margin) is fetched again before it is sent.
        (folder / "lifetime").write_text("2")
        tls_server.token = "third"
        (folder / "token").write_text("third")
        api.http.credentials.invalidate()
        assert names(api) == ["web"]
        count = len(runs())
        assert names(api) == ["web"]
        assert len(runs()) == count + 1
    finally:
        api.close()


def test_exec_plugin_failure_is_an_api_error_with_its_last_line(tls_server, tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/sh\necho 'first line' >&2\necho 'login expired, run the login tool' >&2\nexit 3\n")
    script.chmod(0o755)
    path = kubeconfig(tmp_path / "kc", tls_server.url, {"certificate-authority-data": b64(tls_server.ca_pem)},
                      {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(script)}})
    api = ApiClient.from_settings(path)
    try:
        with pytest.raises(ApiError) as err:
            names(api)
        assert str(err.value) == (f"LIST /api/v1/services: exec plugin {script} exited 3: "
                                  "login expired, run the login tool")
    finally:
        api.close()


def test_in_cluster_token_rotation(tls_server, tmp_path):
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(tls_server.token)
    (sa / "ca.crt").write_bytes(tls_server.ca_pem)
    (sa / "namespace").write_text("monitoring")
    port = tls_server.url.rsplit(":", 1)[1]
    config = load_config(None, environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port},
                         service_account_dir=str(sa))
    assert config.namespace == "monitoring"
    api = ApiClient.from_config(config)
    try:
        assert names(api) == ["web"]
        # The kubelet rotates the bound token: after a 401 the file is read again.
        tls_server.token = "rotated-1"
        (sa / "token").write_text("rotated-1")
        assert names(api) == ["web"]
    finally:
        api.close()
    # And without a 401, at least once a minute.
    now = [1000.0]
    credentials = Credentials(config, clock=lambda: now[0])
    assert credentials.current().authorization == "Bearer rotated-1"
    (sa / "token").write_text("rotated-2")
    now[0] += 30
    assert credentials.current().authorization == "Bearer rotated-1"
    now[0] += 31
    assert credentials.current().authorization == "Bearer rotated-2"


@pytest.mark.parametrize("user, named", [
    ({"auth-provider": {"name": "gcp", "config": {}}}, "auth-provider gcp"),
    ({"auth-provider": {"name": "oidc"}}, "auth-provider oidc"),
    ({"token": "x", "as": "admin"}, "uses as,"),
    ({"exec": {"apiVersion": "client.authentication.k8s.io/v1alpha1", "command": "x"}},
     "client.authentication.k8s.io/v1alpha1 is not supported"),
])
def test_unsupported_auth_is_one_line(tmp_path, user, named):
    path = kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", {}, user)
    with pytest.raises(KubeConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert named in message and message.startswith(f"cannot use --kubeconfig {path}: ")
    assert "\n" not in message


def test_tls_server_name_is_the_name_verified(tls_server, tmp_path):
    ca = {"certificate-authority-data": b64(tls_server.ca_pem)}
    user = {"token": tls_server.token}
    # The stand-in's certificate names IP 127.0.0.1 and DNS kubenode-test-apiserver.
    api = ApiClient.from_settings(kubeconfig(tmp_path / "kc", tls_server.url,
                                             {**ca, "tls-server-name": "kubenode-test-apiserver"}, user))
    try:
        assert names(api) == ["web"]
    finally:
        api.close()
    other = ApiClient.from_settings(kubeconfig(tmp_path / "kc2", tls_server.url,
                                               {**ca, "tls-server-name": "kubernetes.default.svc"}, user))
    try:
        with pytest.raises(ApiError, match="CERTIFICATE_VERIFY_FAILED.*kubernetes.default.svc"):
            names(other)
    finally:
        other.close()
    insecure = ApiClient.from_settings(kubeconfig(tmp_path / "kc3", tls_server.url,
                                                  {"insecure-skip-tls-verify": True}, user))
    try:
        assert names(insecure) == ["web"]  # no CA given and none checked, as the kubeconfig asks
    finally:
        insecure.close()
