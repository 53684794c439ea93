"""--web.config.file for real: the exporter started as a process, TLS with a CA and
certificates made here, client certificates, basic auth, and bad files."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exporter.config import ConfigError
from exporter.webconfig import BasicAuth, parse_basic_authorization, read_web_config

PASSWORD = "s3cret-scrape"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca, cn: str, *, server: bool, sans: list[x509.GeneralName]):
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def write_pair(directory: Path, stem: str, pair) -> tuple[Path, Path]:
    cert, key = pair
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp(f"deploy-pki-{os.getpid()}")
    server_ca, client_ca, rogue_ca = make_ca("server CA"), make_ca("client CA"), make_ca("rogue CA")
    write_pair(d, "server-ca", server_ca)
    write_pair(d, "client-ca", client_ca)
    write_pair(d, "rogue-ca", rogue_ca)
    write_pair(d, "server", issue(server_ca, "localhost", server=True,
                                  sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    write_pair(d, "client", issue(client_ca, "prometheus", server=False,
                                  sans=[x509.DNSName("prometheus.monitoring.svc")]))
    write_pair(d, "other-client", issue(client_ca, "someone", server=False, sans=[x509.DNSName("someone.example")]))
    write_pair(d, "rogue-client", issue(rogue_ca, "prometheus", server=False,
                                        sans=[x509.DNSName("prometheus.monitoring.svc")]))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Exporter:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port


@pytest.fixture
def start_exporter(tmp_path):
    procs = []

    def start(web_config: str, probe_context: ssl.SSLContext | None) -> Exporter:
        cfg = tmp_path / "web.yml"
        cfg.write_text(web_config)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{port}",
             "--web.config.file", str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig")})
        procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"exporter exited {proc.returncode}: {proc.stderr.read()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return Exporter(proc, port)
            time.sleep(0.1)
        raise AssertionError("exporter did not listen in 15 s")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def client_context(pki: Path, trust: str = "server-ca", cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / f"{trust}.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def request(port: int, path: str = "/metrics", ctx: ssl.SSLContext | None = None,
            auth: tuple[str, str] | None = None, host: str = "localhost") -> tuple[int, dict, bytes]:
    if ctx is None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    else:
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def tls_config(pki: Path, extra: str = "") -> str:
    return (f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
            + extra)


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    # Cost 4 keeps the test quick; the cost is read from the hash, any cost works.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def is_refused_handshake(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        status, _, _ = request(port, ctx=ctx)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        return True
    return status not in range(200, 300)


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_client_trusting_the_ca_gets_metrics(pki, start_exporter):
    exp = start_exporter(tls_config(pki), None)
    status, headers, body = request(exp.port, ctx=client_context(pki))
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"python_info" in body or b"kubenode_" in body or body == b""
    assert request(exp.port, "/healthz", ctx=client_context(pki))[2] == b"ok\n"


def test_tls_client_not_trusting_the_ca_is_refused(pki, start_exporter):
    exp = start_exporter(tls_config(pki), None)
    with pytest.raises(ssl.SSLCertVerificationError):
        request(exp.port, ctx=client_context(pki, trust="rogue-ca"))


def test_plain_http_to_the_tls_port_fails_and_only_one_port_listens(pki, start_exporter):
    exp = start_exporter(tls_config(pki), None)
    # An HTTP request on the TLS socket never gets an HTTP answer.
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
        request(exp.port, ctx=None)
    listening = _listening_ports(exp.proc.pid)
    assert listening == {exp.port}, listening
    # The server still answers TLS after the plain attempt.
    assert request(exp.port, ctx=client_context(pki))[0] == 200


def test_a_silent_client_does_not_stall_the_tls_server(pki, start_exporter):
    exp = start_exporter(tls_config(pki), None)
    with socket.create_connection(("127.0.0.1", exp.port)):  # connects, never handshakes
        t0 = time.monotonic()
        assert request(exp.port, ctx=client_context(pki))[0] == 200
        assert time.monotonic() - t0 < 5


def test_min_version_tls13_refuses_a_tls12_client(pki, start_exporter):
    exp = start_exporter(tls_config(pki, "  min_version: TLS13\n"), None)
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        request(exp.port, ctx=ctx)
    assert request(exp.port, ctx=client_context(pki))[0] == 200


def test_cipher_suites_are_enforced_for_tls12(pki, start_exporter):
    exp = start_exporter(tls_config(pki, "  max_version: TLS12\n  cipher_suites: "
                                         "[TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]\n"), None)
    ctx = client_context(pki)
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with pytest.raises(ssl.SSLError):
        request(exp.port, ctx=ctx)
    ctx = client_context(pki)
    conn = http.client.HTTPSConnection("localhost", exp.port, context=ctx, timeout=10)
    conn.connect()
    assert conn.sock.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()


# --- client certificates -------------------------------------------------------------------------

REQUIRE = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki}/client-ca.crt\n"


def test_require_and_verify_client_cert(pki, start_exporter):
    exp = start_exporter(tls_config(pki, REQUIRE.format(pki=pki)), None)
    assert request(exp.port, ctx=client_context(pki, cert="client"))[0] == 200
    assert is_refused_handshake(exp.port, client_context(pki))  # no certificate
    assert is_refused_handshake(exp.port, client_context(pki, cert="rogue-client"))  # other CA


def test_verify_client_cert_if_given(pki, start_exporter):
    exp = start_exporter(tls_config(pki, "  client_auth_type: VerifyClientCertIfGiven\n"
                                         f"  client_ca_file: {pki}/client-ca.crt\n"), None)
    assert request(exp.port, ctx=client_context(pki))[0] == 200  # none given: fine
    assert request(exp.port, ctx=client_context(pki, cert="client"))[0] == 200
    assert is_refused_handshake(exp.port, client_context(pki, cert="rogue-client"))  # given, bad


def test_require_any_client_cert_still_needs_one(pki, start_exporter):
    exp = start_exporter(tls_config(pki, "  client_auth_type: RequireAnyClientCert\n"
                                         f"  client_ca_file: {pki}/client-ca.crt\n"), None)
    assert request(exp.port, ctx=client_context(pki, cert="client"))[0] == 200
    assert is_refused_handshake(exp.port, client_context(pki))


def test_request_client_cert_requires_nothing(pki, start_exporter):
    exp = start_exporter(tls_config(pki, "  client_auth_type: RequestClientCert\n"), None)
    assert request(exp.port, ctx=client_context(pki))[0] == 200


def test_client_allowed_sans(pki, start_exporter):
    exp = start_exporter(tls_config(pki, REQUIRE.format(pki=pki)
                                    + "  client_allowed_sans: [prometheus.monitoring.svc]\n"), None)
    assert request(exp.port, ctx=client_context(pki, cert="client"))[0] == 200
    assert is_refused_handshake(exp.port, client_context(pki, cert="other-client"))


def test_inline_certificate_and_key(pki, start_exporter):
    indent = lambda text: "\n".join("    " + line for line in text.splitlines())  # noqa: E731
    cfg = ("tls_server_config:\n  cert: |\n" + indent((pki / "server.crt").read_text())
           + "\n  key: |\n" + indent((pki / "server.key").read_text()) + "\n")
    exp = start_exporter(cfg, None)
    assert request(exp.port, ctx=client_context(pki))[0] == 200


def test_rotated_certificate_is_served_without_restart(pki, start_exporter, tmp_path):
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes((pki / "server.crt").read_bytes())
    key.write_bytes((pki / "server.key").read_bytes())
    exp = start_exporter(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n", None)
    assert request(exp.port, ctx=client_context(pki))[0] == 200
    # Replace with a certificate from another CA: the old trust must now fail, the new succeed.
    new_ca = make_ca("rotated CA")
    write_pair(tmp_path, "rotated-ca", new_ca)
    new_cert, new_key = write_pair(tmp_path, "rotated", issue(new_ca, "localhost", server=True,
                                                              sans=[x509.DNSName("localhost")]))
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        request(exp.port, ctx=client_context(pki))
    ctx = ssl.create_default_context(cafile=str(tmp_path / "rotated-ca.crt"))
    assert request(exp.port, ctx=ctx)[0] == 200
    # Prometheus scrapes pod addresses: a client connecting by IP sends no SNI, and the
    # reload must not depend on it. (Name checks off: only the issuing CA matters here.)
    by_ip = ssl.create_default_context(cafile=str(tmp_path / "rotated-ca.crt"))
    by_ip.check_hostname = False
    new_ca2 = make_ca("rotated CA 2")
    write_pair(tmp_path, "rotated-ca2", new_ca2)
    c2, k2 = write_pair(tmp_path, "rotated2", issue(new_ca2, "localhost", server=True,
                                                    sans=[x509.DNSName("localhost")]))
    os.replace(k2, key)
    os.replace(c2, cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        request(exp.port, ctx=by_ip, host="127.0.0.1")
    by_ip2 = ssl.create_default_context(cafile=str(tmp_path / "rotated-ca2.crt"))
    by_ip2.check_hostname = False
    assert request(exp.port, ctx=by_ip2, host="127.0.0.1")[0] == 200


# --- basic auth ----------------------------------------------------------------------------------


def test_basic_auth_over_tls(pki, start_exporter):
    exp = start_exporter(tls_config(pki, "basic_auth_users:\n"
                                    f"  prometheus: '{bcrypt_hash(PASSWORD)}'\n"), None)
    ctx = client_context(pki)
    assert request(exp.port, ctx=ctx, auth=("prometheus", PASSWORD))[0] == 200
    for auth in (None, ("prometheus", "wrong"), ("nobody", PASSWORD)):
        status, headers, _ = request(exp.port, ctx=ctx, auth=auth)
        assert status == 401, auth
        assert headers["www-authenticate"].startswith("Basic ")
    # Every path but /healthz is protected, the landing page and unknown paths included.
    assert request(exp.port, "/", ctx=ctx)[0] == 401
    assert request(exp.port, "/nope", ctx=ctx)[0] == 401
    assert request(exp.port, "/healthz", ctx=ctx)[:3:2] == (200, b"ok\n")


def test_basic_auth_without_tls_and_2y_hashes(start_exporter):
    # htpasswd -B writes $2y$ hashes; users' existing files have them.
    hashed = "$2y$" + bcrypt_hash(PASSWORD)[4:]
    exp = start_exporter(f"basic_auth_users:\n  prom: '{hashed}'\n", None)
    assert request(exp.port, auth=("prom", PASSWORD))[0] == 200
    assert request(exp.port, auth=("prom", PASSWORD + "x"))[0] == 401
    assert request(exp.port)[0] == 401


def test_security_headers_are_added(pki, start_exporter):
    exp = start_exporter(tls_config(pki) + "http_server_config:\n  headers:\n"
                         "    X-Frame-Options: deny\n    X-Content-Type-Options: nosniff\n"
                         "    Strict-Transport-Security: max-age=31536000\n", None)
    _, headers, _ = request(exp.port, ctx=client_context(pki))
    assert headers["x-frame-options"] == "deny"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["strict-transport-security"] == "max-age=31536000"


def test_basic_auth_caches_only_successes():
    hashed = bcrypt_hash(PASSWORD).encode()
    auth = BasicAuth({"u": hashed})
    header = "Basic " + base64.b64encode(f"u:{PASSWORD}".encode()).decode()
    assert auth(header) and auth(header)
    assert len(auth._good) == 1
    assert not auth("Basic " + base64.b64encode(b"u:bad").decode())
    assert len(auth._good) == 1
    assert not auth("Bearer abc") and not auth("Basic !!!") and not auth(None)
    assert parse_basic_authorization("Basic " + base64.b64encode(b"a:b:c").decode()) == ("a", b"b:c")


# --- bad files -----------------------------------------------------------------------------------

BAD_CONFIGS = {
    "unknown key": ("tls_server_config:\n  cert_fil: x\n", "unknown key tls_server_config.cert_fil"),
    "no key file": ("tls_server_config:\n  cert_file: {pki}/server.crt\n", "key_file is missing"),
    "missing file": ("tls_server_config:\n  cert_file: /nonexistent/c.crt\n  key_file: /nonexistent/c.key\n",
                     "cannot read"),
    "bad auth type": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                      "  client_auth_type: Always\n", "is not one of"),
    "verify without CA": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                          "  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
    "CA without policy": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                          "  client_ca_file: {pki}/client-ca.crt\n", "NoClientCert"),
    "key mismatch": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/client.key\n",
                     "client.key does not match the certificate"),
    "bad version": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                    "  min_version: TLS14\n", "min_version"),
    "bad cipher": ("tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
                   "  cipher_suites: [TLS_FAKE]\n", "cipher_suites"),
    "not bcrypt": ("basic_auth_users:\n  u: plaintext\n", "not a bcrypt hash"),
    "bad header": ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "X-Frame-Options"),
    "rate limit": ("rate_limit:\n  interval: 1s\n  burst: 5\n", "rate_limit"),
    "not yaml": ("tls_server_config: [\n", "not valid YAML"),
    "not a mapping": ("- a\n", "must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_web_config_exits_2_with_one_line(case, pki, tmp_path):
    text, expected = BAD_CONFIGS[case]
    cfg = tmp_path / "web.yml"
    cfg.write_text(text.format(pki=pki))
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        read_web_config(str(cfg))
    out = subprocess.run([sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{free_port()}",
                          "--web.config.file", str(cfg)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "KUBECONFIG": str(tmp_path / "none")})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_missing_web_config_file_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "exporter", "--web.config.file", str(tmp_path / "absent.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "cannot read it" in out.stderr


def test_empty_tls_section_means_plain_http(tmp_path):
    cfg = tmp_path / "web.yml"
    cfg.write_text("tls_server_config: {}\n")
    assert read_web_config(str(cfg)).ssl_context() is None


def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN owned by ``pid`` (from /proc/net/tcp{,6} and its fds)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_relative_file_names_are_resolved_against_the_config_folder(pki, start_exporter, tmp_path):
    # As exporter-toolkit does, and as the web-tls component's Secret mount relies on.
    folder = tmp_path / "mounted-secret"
    folder.mkdir()
    for name in ("server.crt", "server.key"):
        (folder / name).write_bytes((pki / name).read_bytes())
    (folder / "web.yml").write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    config = read_web_config(str(folder / "web.yml"))
    assert config.tls.cert_file == str(folder / "server.crt")
    assert config.ssl_context() is not None


# --- a key or certificate file that cannot be used is named ------------------------------------


def _key_file_cases(pki: Path, d: Path) -> dict:
    (d / "garbage.key").write_text("not a key\n")
    (d / "garbage.crt").write_text("not a certificate\n")
    key = serialization.load_pem_private_key((pki / "server.key").read_bytes(), password=None)
    (d / "encrypted.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    return {  # case: (cert file, key file, client CA file, the file the message must name, words)
        "garbage key": (pki / "server.crt", d / "garbage.key", None, d / "garbage.key", "private key"),
        "garbage cert": (d / "garbage.crt", pki / "server.key", None, d / "garbage.crt", "certificate"),
        "mismatched key": (pki / "server.crt", pki / "client.key", None, pki / "client.key", "does not match"),
        "encrypted key": (pki / "server.crt", d / "encrypted.key", None, d / "encrypted.key", "encrypted"),
        "absent key": (pki / "server.crt", d / "absent.key", None, d / "absent.key", "cannot read"),
        "garbage CA": (pki / "server.crt", pki / "server.key", d / "garbage.crt", d / "garbage.crt", "client_ca_file"),
    }


@pytest.mark.parametrize("case", ["garbage key", "garbage cert", "mismatched key", "encrypted key", "absent key",
                                  "garbage CA"])
def test_key_file_errors_name_the_file(case, pki, tmp_path):
    cert, key, ca, named, words = _key_file_cases(pki, tmp_path)[case]
    cfg = tmp_path / "web.yml"
    extra = f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n" if ca else ""
    cfg.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n{extra}")
    with pytest.raises(ConfigError) as err:
        read_web_config(str(cfg))
    assert str(named) in str(err.value) and words in str(err.value), err.value
    out = subprocess.run([sys.executable, "-m", "exporter", "--web.listen-address", f"127.0.0.1:{free_port()}",
                          "--web.config.file", str(cfg)], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, start_new_session=True,  # no terminal to prompt on
                         env={**os.environ, "KUBECONFIG": str(tmp_path / "none")})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(named) in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_web_config_not_utf8_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "web.yml"
    cfg.write_bytes(b"basic_auth_users:\n  caf\xe9: x\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_web_config(str(cfg))
    out = subprocess.run([sys.executable, "-m", "exporter", "--web.config.file", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and str(cfg) in lines[0] and "line 2" in lines[0], out.stderr
