"""``--web.config.file``: TLS and basic auth in Prometheus exporter-toolkit's format.

The file users already have for node_exporter works here: ``tls_server_config``,
``http_server_config`` and ``basic_auth_users``. Where Python's ``ssl`` cannot do
what Go's ``crypto/tls`` does, the choice made is the stricter one, and it is
said below and in docs/security.md:

- ``RequestClientCert`` asks for nothing: Go would request a certificate and
  neither require nor verify it, which grants nothing, so not asking is the same.
- ``RequireAnyClientCert`` verifies the certificate against ``client_ca_file``
  (Python cannot require a certificate it does not verify), so it needs one.
- ``curve_preferences``: one curve restricts the handshake to it; with several,
  OpenSSL's default groups (which contain them) are kept.
- ``http2`` is accepted and ignored (HTTP/1.1 only); ``rate_limit`` is refused.

Certificates are re-read when their files change, on the next handshake, as
exporter-toolkit picks up rotated certificates; basic auth users are read once.
Every mistake is a ``ConfigError`` with one line naming the file and the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from exporter.config import ConfigError, read_yaml

log = logging.getLogger("exporter.webconfig")

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                     "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
# exporter-toolkit still accepts this older spelling of RequireAnyClientCert.
CLIENT_AUTH_ALIASES = {"RequireClientCert": "RequireAnyClientCert"}

# Go's names of the TLS 1.0-1.2 suites it accepts, as OpenSSL spells them. TLS 1.3
# suites are fixed in Go and left to OpenSSL's defaults here, as there.
GO_CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    # Go's older aliases of the two above.
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
}

GO_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
             "X25519": "X25519"}

SECURITY_HEADERS = {
    "Content-Security-Policy": None,
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-Content-Type-Options": ("nosniff",),
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}

TLS_KEYS = {"cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
            "client_allowed_sans", "min_version", "max_version", "cipher_suites",
            "prefer_server_cipher_suites", "curve_preferences"}
TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
HTTP_KEYS = {"http2", "headers"}


@dataclass(frozen=True)
class TLSSettings:
    """``tls_server_config``, checked; file names resolved against the config's folder."""

    cert_file: str | None
    key_file: str | None
    cert_pem: str | None
    key_pem: str | None
    client_auth_type: str
    client_ca_file: str | None
    client_ca_pem: str | None
    client_allowed_sans: tuple[str, ...]
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    ciphers: str | None
    prefer_server_cipher_suites: bool
    curve: str | None

    def files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True)
class WebConfig:
    """What the web config file asks for: TLS (or None), basic auth users, extra headers."""

    path: str
    tls: TLSSettings | None = None
    basic_auth_users: dict[str, bytes] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        return CertificateReloader(self.tls, self.path).context

    def authenticator(self) -> Callable[[str | None], bool] | None:
        return BasicAuth(self.basic_auth_users) if self.basic_auth_users else None


def load_web_config(path: str) -> ssl.SSLContext | None:
    """The TLS context the file asks for (None: plain HTTP). Raises ConfigError."""
    return read_web_config(path).ssl_context()


def read_web_config(path: str) -> WebConfig:
    """Parse and check the file; build the TLS context once so bad keys fail now."""
    data = read_yaml(path, "web config file")
    try:
        config = parse_web_config(data or {}, os.path.dirname(os.path.abspath(path)), path)
        config.ssl_context()
    except ValueError as err:
        raise ConfigError(f"web config file {path}: {err}") from None
    return config


def parse_web_config(data: Any, base_dir: str, path: str = "") -> WebConfig:
    """A mapping as exporter-toolkit reads it -> WebConfig; ValueError("one line") if wrong."""
    _mapping(data, "the file")
    _no_unknown(data, TOP_KEYS, "")
    if data.get("rate_limit") is not None:
        raise ValueError("rate_limit is not supported; rate-limit in front of the exporter instead")
    tls = _parse_tls(_mapping(data.get("tls_server_config") or {}, "tls_server_config"), base_dir)
    headers = _parse_http(_mapping(data.get("http_server_config") or {}, "http_server_config"))
    users = _parse_users(_mapping(data.get("basic_auth_users") or {}, "basic_auth_users"))
    return WebConfig(path=path, tls=tls, basic_auth_users=users, headers=headers)


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping")
    return value


def _no_unknown(mapping: dict, known: set[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in set(mapping) - known)
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]}")


def _string(mapping: dict, key: str, prefix: str) -> str | None:
    value = mapping.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"{prefix}{key} must be a string")
    return value


def _strings(mapping: dict, key: str, prefix: str) -> tuple[str, ...]:
    value = mapping.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{prefix}{key} must be a list of strings")
    return tuple(value)


def _parse_tls(raw: dict, base_dir: str) -> TLSSettings | None:
    p = "tls_server_config."
    _no_unknown(raw, TLS_KEYS, p)

    def file(key: str) -> str | None:
        name = _string(raw, key, p)
        return os.path.join(base_dir, name) if name else None

    cert_file, key_file, ca_file = file("cert_file"), file("key_file"), file("client_ca_file")
    cert_pem, key_pem, ca_pem = _string(raw, "cert", p), _string(raw, "key", p), _string(raw, "client_ca", p)
    auth = _string(raw, "client_auth_type", p) or "NoClientCert"
    auth = CLIENT_AUTH_ALIASES.get(auth, auth)
    if not (cert_file or key_file or cert_pem or key_pem) and auth == "NoClientCert" and not (ca_file or ca_pem):
        return None  # as exporter-toolkit: no certificate configured means plain HTTP
    for a, b in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if raw.get(a) and raw.get(b):
            raise ValueError(f"{p}{a} and {p}{b} are both set; use one")
    if not (cert_file or cert_pem):
        raise ValueError(f"{p}cert_file is missing")
    if not (key_file or key_pem):
        raise ValueError(f"{p}key_file is missing")
    if auth not in CLIENT_AUTH_TYPES:
        raise ValueError(f"{p}client_auth_type {auth!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}")
    has_ca = bool(ca_file or ca_pem)
    if has_ca and auth == "NoClientCert":
        raise ValueError(f"{p}client_ca_file is set but client_auth_type is NoClientCert")
    if not has_ca and auth in ("RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        raise ValueError(f"{p}client_auth_type {auth} needs client_ca_file")
    sans = _strings(raw, "client_allowed_sans", p)
    if sans and auth not in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
        raise ValueError(f"{p}client_allowed_sans needs client_auth_type RequireAndVerifyClientCert")

    def version(key: str, default: str) -> ssl.TLSVersion:
        name = _string(raw, key, p) or default
        if name not in TLS_VERSIONS:
            raise ValueError(f"{p}{key} {name!r} is not one of {', '.join(TLS_VERSIONS)}")
        return TLS_VERSIONS[name]

    min_version, max_version = version("min_version", "TLS12"), version("max_version", "TLS13")
    if min_version > max_version:
        raise ValueError(f"{p}min_version is above max_version")
    suites = _strings(raw, "cipher_suites", p)
    for suite in suites:
        if suite not in GO_CIPHER_SUITES:
            raise ValueError(f"{p}cipher_suites: {suite!r} is not a cipher suite Go accepts")
    curves = _strings(raw, "curve_preferences", p)
    for curve in curves:
        if curve not in GO_CURVES:
            raise ValueError(f"{p}curve_preferences: {curve!r} is not one of {', '.join(GO_CURVES)}")
    prefer = raw.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise ValueError(f"{p}prefer_server_cipher_suites must be true or false")
    return TLSSettings(
        cert_file=cert_file, key_file=key_file, cert_pem=cert_pem, key_pem=key_pem,
        client_auth_type=auth, client_ca_file=ca_file, client_ca_pem=ca_pem,
        client_allowed_sans=sans, min_version=min_version, max_version=max_version,
        ciphers=":".join(GO_CIPHER_SUITES[s] for s in suites) or None,
        prefer_server_cipher_suites=prefer,
        curve=GO_CURVES[curves[0]] if len(curves) == 1 else None,
    )


def _parse_http(raw: dict) -> tuple[tuple[str, str], ...]:
    p = "http_server_config."
    _no_unknown(raw, HTTP_KEYS, p)
    if not isinstance(raw.get("http2", True), bool):
        raise ValueError(f"{p}http2 must be true or false")
    headers = _mapping(raw.get("headers") or {}, p + "headers")
    out = []
    for name, value in headers.items():
        if name not in SECURITY_HEADERS:
            raise ValueError(f"{p}headers: {name!r} is not one of {', '.join(SECURITY_HEADERS)}")
        if value in (None, ""):
            continue
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise ValueError(f"{p}headers.{name} must be a one-line string")
        allowed = SECURITY_HEADERS[name]
        if allowed and value.lower() not in allowed:
            raise ValueError(f"{p}headers.{name} must be one of {', '.join(allowed)}")
        out.append((name, value))
    return tuple(out)


def _parse_users(raw: dict) -> dict[str, bytes]:
    users = {}
    for user, hashed in raw.items():
        if not isinstance(user, str) or not isinstance(hashed, str):
            raise ValueError("basic_auth_users must map user names to bcrypt hashes")
        if ":" in user:
            raise ValueError(f"basic_auth_users: user name {user!r} contains ':'")
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60:
            raise ValueError(f"basic_auth_users.{user} is not a bcrypt hash")
        users[user] = hashed.encode()
    return users


class CertificateReloader:
    """An SSL context whose certificates follow their files.

    ``context`` is the listening context; its SNI callback (run on every
    handshake) swaps in a context rebuilt from the files when their modification
    times change, so a rotated certificate (cert-manager, a re-mounted Secret)
    is served without a restart. A rebuild that fails keeps the previous one.
    """

    def __init__(self, tls: TLSSettings, path: str) -> None:
        self.tls = tls
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._current = build_ssl_context(tls)
        self.context = build_ssl_context(tls)
        if tls.files():
            self.context.sni_callback = self._on_handshake

    def _mtimes(self) -> tuple:
        stamps = []
        for name in self.tls.files():
            try:
                st = os.stat(name)
                stamps.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _on_handshake(self, sock: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        with self._lock:
            stamp = self._mtimes()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._current = build_ssl_context(self.tls)
                    log.info("web config %s: certificates changed, reloaded", self.path)
                except (OSError, ValueError, ssl.SSLError) as err:
                    log.error("web config %s: certificates changed but cannot be loaded, keeping the "
                              "previous ones: %s", self.path, err)
            sock.context = self._current
        return None


def build_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version
    ctx.maximum_version = tls.max_version
    try:
        _load_cert_chain(ctx, tls)
        if tls.client_ca_file:
            ctx.load_verify_locations(cafile=tls.client_ca_file)
        elif tls.client_ca_pem:
            ctx.load_verify_locations(cadata=tls.client_ca_pem)
    except _EncryptedKey:
        raise ValueError(f"{_key_source(tls)} is encrypted; give an unencrypted key "
                         "(exporter-toolkit reads no passphrase)") from None
    except ssl.SSLError as err:  # before OSError: it is one
        raise ValueError(_unusable(tls, err)) from None
    except OSError as err:
        raise ValueError(_unreadable(tls, err)) from None
    ctx.verify_mode = {
        "NoClientCert": ssl.CERT_NONE,
        "RequestClientCert": ssl.CERT_NONE,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        "RequireAnyClientCert": ssl.CERT_REQUIRED,
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
    }[tls.client_auth_type]
    if tls.ciphers:
        try:
            ctx.set_ciphers(tls.ciphers)
        except ssl.SSLError:
            raise ValueError("cipher_suites: none of them is available in this OpenSSL") from None
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve:
        ctx.set_ecdh_curve(tls.curve)
    return ctx


class _EncryptedKey(Exception):
    """The key asks for a passphrase (OpenSSL would otherwise prompt on the terminal)."""


def _refuse_passphrase() -> bytes:
    raise _EncryptedKey()


def _cert_source(tls: TLSSettings) -> str:
    return f"cert_file {tls.cert_file}" if tls.cert_file else "the inline cert"


def _key_source(tls: TLSSettings) -> str:
    return f"key_file {tls.key_file}" if tls.key_file else "the inline key"


def _unreadable(tls: TLSSettings, err: OSError) -> str:
    """OpenSSL's file errors carry no file name: find the file that cannot be opened."""
    for key, name in (("cert_file", tls.cert_file), ("key_file", tls.key_file), ("client_ca_file", tls.client_ca_file)):
        if name:
            try:
                with open(name, "rb"):
                    pass
            except OSError as own:
                return f"cannot read {key} {name}: {own.strerror or own}"
    return f"cannot read a certificate or key: {err.strerror or err}"


def _unusable(tls: TLSSettings, err: ssl.SSLError) -> str:
    """Which file OpenSSL refused: it says only "PEM lib" for a bad certificate and a bad key alike."""
    reason = err.reason or str(err)
    if err.reason == "KEY_VALUES_MISMATCH":
        return f"{_key_source(tls)} does not match the certificate in {_cert_source(tls)}"
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        if tls.cert_file:
            probe.load_verify_locations(cafile=tls.cert_file)
        else:
            probe.load_verify_locations(cadata=tls.cert_pem)
    except (ssl.SSLError, ValueError):
        return f"{_cert_source(tls)} holds no usable PEM certificate ({reason})"
    except OSError:
        pass
    ca = tls.client_ca_file or ("the inline client_ca" if tls.client_ca_pem else None)
    key_ok = _key_loads(tls)
    if key_ok and ca:
        return f"client_ca_file {ca} holds no usable PEM certificate ({reason})"
    return f"{_key_source(tls)} holds no usable PEM private key ({reason})"


def _key_loads(tls: TLSSettings) -> bool:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        _load_cert_chain(probe, tls)
    except (ssl.SSLError, OSError, _EncryptedKey):
        return False
    return True


def _load_cert_chain(ctx: ssl.SSLContext, tls: TLSSettings) -> None:
    """Files as they are; inline PEM through memory-only files (no writable disk needed)."""
    opened = []
    try:
        def source(file: str | None, pem: str | None, name: str) -> str:
            if file:
                return file
            fd = os.memfd_create(f"kubenode-{name}", os.MFD_CLOEXEC)
            opened.append(fd)
            os.write(fd, pem.encode())
            return f"/proc/self/fd/{fd}"

        ctx.load_cert_chain(source(tls.cert_file, tls.cert_pem, "cert"),
                            source(tls.key_file, tls.key_pem, "key"), password=_refuse_passphrase)
    finally:
        for fd in opened:
            os.close(fd)


def peer_matches_sans(peer_cert: dict | None, allowed: tuple[str, ...]) -> bool:
    """Any DNS, IP, email or URI SAN of the verified peer certificate is in ``allowed``."""
    if not allowed:
        return True
    if not peer_cert:
        return False
    return any(value in allowed for _kind, value in peer_cert.get("subjectAltName", ()))


class BasicAuth:
    """``Authorization: Basic`` against bcrypt hashes, with successes cached.

    bcrypt costs tens of milliseconds by design; Prometheus scrapes with the same
    credentials every interval, so a success is remembered under a keyed digest
    of (user, password, hash) as exporter-toolkit does. Failures are never cached.
    """

    CACHE_LIMIT = 64

    def __init__(self, users: dict[str, bytes]) -> None:
        import bcrypt  # imported only when basic auth is configured

        self._bcrypt = bcrypt
        self.users = users
        self._key = os.urandom(32)
        self._good: set[bytes] = set()
        # Checked when the user name is unknown, so a wrong name costs as long as a
        # wrong password (same cost as a configured hash: its first 29 bytes are the salt).
        self._dummy = bcrypt.hashpw(os.urandom(16), next(iter(users.values()))[:29])
        self._lock = threading.Lock()

    def __call__(self, authorization: str | None) -> bool:
        credentials = parse_basic_authorization(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self.users.get(user)
        digest = hmac.new(self._key, b"\0".join((user.encode(), password, hashed or b"")),
                          hashlib.sha256).digest()
        with self._lock:
            if hashed is not None and digest in self._good:
                return True
        try:
            ok = self._bcrypt.checkpw(password, hashed or self._dummy) and hashed is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if len(self._good) >= self.CACHE_LIMIT:
                    self._good.clear()
                self._good.add(digest)
        return ok


def parse_basic_authorization(header: str | None) -> tuple[str, bytes] | None:
    """``Basic base64(user:password)`` -> (user, password bytes); None when absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None
