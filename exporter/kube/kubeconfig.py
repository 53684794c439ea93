"""Where the Kubernetes API is and how to authenticate to it, from a kubeconfig or in-cluster.

The order is the contract's: ``--kubeconfig``, else ``KUBECONFIG`` (a colon list: the
first file of it that exists is used whole; files are not merged as kubectl merges
them), else the pod's service account (``KUBERNETES_SERVICE_HOST``/``_PORT`` and the
token, ``ca.crt`` and ``namespace`` under ``SERVICE_ACCOUNT_DIR``).

Reading the configuration is pure (``config_from_kubeconfig``,
``config_from_service_account`` return an ``ApiConfig`` of plain values). What changes
while the exporter runs is owned by ``Credentials``: a token file re-read every minute
(bound service account tokens rotate) and an exec credential plugin's output, run again
when it expires or when the API answers 401. Credentials are fetched on the reflectors'
threads, never on a scrape.

Supported kubeconfig fields: ``current-context``; the cluster's ``server``,
``certificate-authority`` / ``-data``, ``insecure-skip-tls-verify``, ``tls-server-name``;
the user's ``token`` / ``tokenFile``, ``client-certificate`` / ``-data`` with
``client-key`` / ``-data``, ``username`` / ``password``, and ``exec``
(client.authentication.k8s.io v1 and v1beta1). Relative paths are relative to the
kubeconfig's own folder. Anything else that changes how to connect (``auth-provider``,
impersonation, ``proxy-url``) is refused with one line naming it.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
# client-go re-reads a token file at most once a minute (and at once after a 401).
TOKEN_FILE_MAX_AGE = 60.0
# An exec plugin that does not answer in this time is killed; the reflector retries later.
EXEC_TIMEOUT = 60.0
# A credential this close to its expiry is fetched again before use.
EXPIRY_MARGIN = 10.0


class KubeConfigError(Exception):
    """No usable API configuration; the message says which source failed and why."""


class KubeNotConfigured(KubeConfigError):
    """No API configuration at all: no kubeconfig given, none in the environment, not
    in a cluster. A feature this node lacks (reported once), not a broken config."""


class CredentialError(Exception):
    """A credential could not be had at run time (token file unreadable, exec plugin failed)."""


@dataclass(frozen=True)
class ExecPlugin:
    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = EXEC_API_VERSIONS[0]
    provide_cluster_info: bool = False


@dataclass(frozen=True)
class ApiConfig:
    """One cluster and one user, every path absolute, every ``*_data`` decoded to bytes."""

    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    token: str | None = None
    token_file: str | None = None
    client_cert_file: str | None = None
    client_cert_data: bytes | None = None
    client_key_file: str | None = None
    client_key_data: bytes | None = None
    username: str | None = None
    password: str | None = None
    exec_plugin: ExecPlugin | None = None
    namespace: str = "default"
    source: str = field(default="", compare=False)  # for messages: which file or "in-cluster"


# --- reading the sources -------------------------------------------------------


def load_config(kubeconfig: str | None = None, environ: Mapping[str, str] | None = None,
                service_account_dir: str = SERVICE_ACCOUNT_DIR, context: str | None = None) -> ApiConfig:
    """The contract's order: --kubeconfig, else $KUBECONFIG, else in-cluster.

    Raises KubeConfigError with one line naming the source that was tried
    (KubeNotConfigured when there is none at all).
    """
    env = os.environ if environ is None else environ
    path = kubeconfig or None
    source = "--kubeconfig"
    if not path and env.get("KUBECONFIG"):
        candidates = [p for p in env["KUBECONFIG"].split(os.pathsep) if p]
        path = next((p for p in candidates if os.path.isfile(os.path.expanduser(p))),
                    candidates[0] if candidates else None)
        source = "KUBECONFIG"
    if not path and not env.get("KUBERNETES_SERVICE_HOST"):
        raise KubeNotConfigured("no --kubeconfig, no KUBECONFIG and not in a cluster "
                                "(KUBERNETES_SERVICE_HOST unset)")
    where = f"{source} {path}" if path else "in-cluster service account"
    try:
        if path:
            path = os.path.expanduser(path)
            with open(path, "rb") as fh:
                raw = fh.read()
            return config_from_kubeconfig(_parse_yaml(raw), os.path.dirname(os.path.abspath(path)),
                                          context, source=path)
        return config_from_service_account(service_account_dir, env)
    except KubeConfigError as err:
        raise KubeConfigError(f"cannot use {where}: {err}") from None
    except (OSError, ValueError) as err:
        raise KubeConfigError(f"cannot use {where}: {err}") from None


def _parse_yaml(raw: bytes) -> Any:
    from exporter import yamlload

    documents = yamlload.load_all(yamlload.decode_utf8(raw))
    if len(documents) != 1:
        raise KubeConfigError(f"expected one YAML document, found {len(documents)}")
    return documents[0]


def config_from_service_account(directory: str, environ: Mapping[str, str]) -> ApiConfig:
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT") or "443"
    if not host:
        raise KubeConfigError("KUBERNETES_SERVICE_HOST unset")
    token_file = os.path.join(directory, "token")
    if not os.access(token_file, os.R_OK):
        raise KubeConfigError(f"no readable token at {token_file}")
    namespace = "default"
    try:
        with open(os.path.join(directory, "namespace"), encoding="utf-8") as fh:
            namespace = fh.read().strip() or namespace
    except OSError:
        pass
    host = f"[{host}]" if ":" in host else host
    return ApiConfig(server=f"https://{host}:{port}", ca_file=os.path.join(directory, "ca.crt"),
                     token_file=token_file, namespace=namespace, source="in-cluster")


def _named(doc: dict, section: str, name: str | None, what: str) -> dict:
    """The ``what`` body of the entry ``name`` in ``doc[section]``."""
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise KubeConfigError(f"{section} is not a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(what) or {}
            if not isinstance(body, dict):
                raise KubeConfigError(f"{section} entry {name!r} has no {what} mapping")
            return body
    raise KubeConfigError(f"no {what} named {name!r} in {section}")


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=False)
    except ValueError as err:
        raise KubeConfigError(f"{what} is not base64: {err}") from None


def _str(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise KubeConfigError(f"{key} is not a string")
    return str(value)


UNSUPPORTED_USER_FIELDS = ("auth-provider", "as", "as-uid", "as-groups", "as-user-extra")
UNSUPPORTED_CLUSTER_FIELDS = ("proxy-url",)


def config_from_kubeconfig(doc: Any, folder: str, context: str | None = None, source: str = "") -> ApiConfig:
    """The ``ApiConfig`` of ``context`` (default: current-context) in a parsed kubeconfig.

    Relative file paths are resolved against ``folder``, the kubeconfig's own folder.
    """
    if not isinstance(doc, dict):
        raise KubeConfigError("not a kubeconfig (the document is not a mapping)")
    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError("no current-context")
    ctx = _named(doc, "contexts", name, "context")
    cluster = _named(doc, "clusters", ctx.get("cluster"), "cluster")
    user = _named(doc, "users", ctx.get("user"), "user") if ctx.get("user") else {}
    for key in UNSUPPORTED_USER_FIELDS:
        if user.get(key):
            detail = user[key].get("name") if key == "auth-provider" and isinstance(user[key], dict) else None
            raise KubeConfigError(f"user {ctx.get('user')!r} uses {key}{f' {detail}' if detail else ''}, "
                                  "which this exporter does not support (use a token, a client certificate "
                                  "or an exec plugin)")
    for key in UNSUPPORTED_CLUSTER_FIELDS:
        if cluster.get(key):
            raise KubeConfigError(f"cluster {ctx.get('cluster')!r} uses {key}, which this exporter does not support")

    def path(body: dict, key: str) -> str | None:
        value = _str(body, key)
        return os.path.join(folder, os.path.expanduser(value)) if value else None

    server = _str(cluster, "server")
    if not server:
        raise KubeConfigError(f"cluster {ctx.get('cluster')!r} has no server")
    data = {key: _b64(body[key], key) for body, key in ((cluster, "certificate-authority-data"),
                                                        (user, "client-certificate-data"),
                                                        (user, "client-key-data")) if body.get(key)}
    return ApiConfig(
        server=server.rstrip("/"),
        ca_file=path(cluster, "certificate-authority"),
        ca_data=data.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=_str(cluster, "tls-server-name"),
        token=_str(user, "token"),
        token_file=path(user, "tokenFile"),
        client_cert_file=path(user, "client-certificate"),
        client_cert_data=data.get("client-certificate-data"),
        client_key_file=path(user, "client-key"),
        client_key_data=data.get("client-key-data"),
        username=_str(user, "username"),
        password=_str(user, "password"),
        exec_plugin=_exec_plugin(user.get("exec"), folder) if user.get("exec") else None,
        namespace=_str(ctx, "namespace") or "default",
        source=source,
    )


def _exec_plugin(body: Any, folder: str) -> ExecPlugin:
    if not isinstance(body, dict) or not _str(body, "command"):
        raise KubeConfigError("user exec has no command")
    version = _str(body, "apiVersion") or ""
    if version not in EXEC_API_VERSIONS:
        raise KubeConfigError(f"exec plugin apiVersion {version or '(none)'} is not supported "
                              f"(only {' and '.join(EXEC_API_VERSIONS)})")
    if body.get("interactiveMode") == "Always":
        raise KubeConfigError("exec plugin with interactiveMode Always: the exporter has no terminal")
    command = _str(body, "command")
    # client-go: a command with a path separator is relative to the kubeconfig; a bare name is looked up in PATH.
    if os.sep in command and not os.path.isabs(command):
        command = os.path.join(folder, command)
    args = body.get("args") or []
    env = body.get("env") or []
    if not isinstance(args, list) or not isinstance(env, list):
        raise KubeConfigError("exec plugin args and env must be lists")
    pairs = []
    for item in env:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise KubeConfigError("exec plugin env entries need a name and a value")
        pairs.append((item["name"], str(item.get("value") or "")))
    return ExecPlugin(command, tuple(str(a) for a in args), tuple(pairs), version,
                      bool(body.get("provideClusterInfo")))


# --- credentials at run time ---------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """What goes with a request now: an Authorization header and/or a client certificate."""

    authorization: str | None = None
    client_cert: tuple[bytes, bytes] | None = None  # PEM certificate, PEM key (from an exec plugin)
    expires: float | None = None  # time.time() after which it must be fetched again


def parse_exec_credential(stdout: bytes, api_version: str, now: float) -> Credential:
    """An ExecCredential printed by a plugin; CredentialError when it is not one."""
    try:
        body = json.loads(stdout)
    except ValueError:
        raise CredentialError("the exec plugin's output is not JSON") from None
    if not isinstance(body, dict) or body.get("kind") != "ExecCredential":
        raise CredentialError("the exec plugin's output is not an ExecCredential")
    if body.get("apiVersion") != api_version:
        raise CredentialError(f"the exec plugin answered {body.get('apiVersion')}, not {api_version}")
    status = body.get("status")
    if not isinstance(status, dict):
        raise CredentialError("the exec plugin's ExecCredential has no status")
    expires = None
    stamp = status.get("expirationTimestamp")
    if stamp:
        try:
            expires = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise CredentialError(f"the exec plugin's expirationTimestamp {stamp!r} is not RFC 3339") from None
    token = status.get("token")
    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
    if bool(cert) != bool(key):
        raise CredentialError("the exec plugin gave clientCertificateData without clientKeyData or the reverse")
    if not token and not cert:
        raise CredentialError("the exec plugin gave neither a token nor a client certificate")
    return Credential(f"Bearer {token}" if token else None,
                      (str(cert).encode(), str(key).encode()) if cert else None, expires)


def exec_info(plugin: ExecPlugin, config: ApiConfig) -> str:
    """KUBERNETES_EXEC_INFO: the request's ExecCredential, with the cluster when asked for."""
    spec: dict[str, Any] = {"interactive": False}
    if plugin.provide_cluster_info:
        cluster: dict[str, Any] = {"server": config.server, "insecure-skip-tls-verify": config.insecure}
        if config.tls_server_name:
            cluster["tls-server-name"] = config.tls_server_name
        if config.ca_data:
            cluster["certificate-authority-data"] = base64.b64encode(config.ca_data).decode()
        spec["cluster"] = cluster
    return json.dumps({"apiVersion": plugin.api_version, "kind": "ExecCredential", "spec": spec})


def run_exec_plugin(plugin: ExecPlugin, config: ApiConfig, timeout: float = EXEC_TIMEOUT) -> bytes:
    """The plugin's stdout; CredentialError on a failure, a non-zero exit or the deadline."""
    env = dict(os.environ)
    env.update(plugin.env)
    env["KUBERNETES_EXEC_INFO"] = exec_info(plugin, config)
    try:
        done = subprocess.run([plugin.command, *plugin.args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CredentialError(f"exec plugin {plugin.command} did not answer within {timeout:.0f}s") from None
    except OSError as err:
        raise CredentialError(f"exec plugin {plugin.command}: {err}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise CredentialError(f"exec plugin {plugin.command} exited {done.returncode}"
                              + (f": {lines[-1][:200]}" if lines else ""))
    return done.stdout


class Credentials:
    """The one owner of a configuration's changing credential; shared by every reflector thread.

    ``current()`` gives the credential to send now: a token file read at most
    ``TOKEN_FILE_MAX_AGE`` ago, or an exec plugin's output until it expires.
    ``invalidate()`` (after a 401) makes the next ``current()`` read or run again.
    """

    def __init__(self, config: ApiConfig, clock: Callable[[], float] = time.time,
                 run_plugin: Callable[[ExecPlugin, ApiConfig], bytes] = run_exec_plugin) -> None:
        self.config = config
        self._clock = clock
        self._run_plugin = run_plugin
        self._lock = threading.Lock()
        self._cached: Credential | None = None
        self.fetches = 0  # token file reads and plugin runs, for tests and logs
        self._static = self._static_credential(config)

    @staticmethod
    def _static_credential(config: ApiConfig) -> Credential | None:
        if config.exec_plugin or config.token_file:
            return None
        if config.token:
            return Credential(f"Bearer {config.token}")
        if config.username is not None and config.password is not None:
            pair = f"{config.username}:{config.password}".encode()
            return Credential("Basic " + base64.b64encode(pair).decode())
        return Credential()

    def current(self) -> Credential:
        if self._static is not None:
            return self._static
        with self._lock:
            now = self._clock()
            cached = self._cached
            if cached is None or (cached.expires is not None and now >= cached.expires - EXPIRY_MARGIN):
                self._cached = cached = self._fetch(now)
            return cached

    def invalidate(self) -> bool:
        """Forget a credential the API refused; False when there is nothing to fetch again."""
        if self._static is not None:
            return False
        with self._lock:
            self._cached = None
        return True

    def _fetch(self, now: float) -> Credential:
        self.fetches += 1
        plugin = self.config.exec_plugin
        if plugin is not None:
            return parse_exec_credential(self._run_plugin(plugin, self.config), plugin.api_version, now)
        try:
            with open(self.config.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as err:
            raise CredentialError(f"cannot read the token file: {err}") from None
        if not token:
            raise CredentialError(f"the token file {self.config.token_file} is empty")
        return Credential(f"Bearer {token}", expires=now + TOKEN_FILE_MAX_AGE + EXPIRY_MARGIN)

